// The host side shared by the CUDA fused convolutions and their host emulation (fused_plan.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "fused_tiles.h"
#include "ops.h"

namespace tdconv {

// The operands of the block program (fused_tiles.h): y1 = x * first^T as NHWC [N * H * W, R_in], the
// spatial factor (CP [R, kh * kw]; Tucker the core as [kh * kw * R_in, R_out]), last^T [R_out, C_out]
// and the bias (undefined without one); all contiguous, on x's device.
struct FusedOperands {
  at::Tensor y1, spatial, last_t, bias;
};

fused::Shape fused_shape(const ConvShape& s);
// Tensor cores (WMMA) for float16 / bfloat16; the SIMT loop for float32 / float64.
bool fused_uses_wmma(at::ScalarType dt);
// The launch plan for x's dtype and layout (an NCHW x gets an NCHW output, written by the kernel).
fused::Plan fused_plan(const ConvShape& s, const at::Tensor& x, bool tucker);
FusedOperands prepare_fused(bool tucker, const ConvShape& s, const at::Tensor& x, const at::Tensor& first,
                            const at::Tensor& spatial, const at::Tensor& last, const std::optional<at::Tensor>& bias);
// The output in x's layout (reads_nhwc): a contiguous NCHW tensor, or channels_last (an NHWC buffer
// [N, Ho, Wo, C_out] seen as [N, C_out, Ho, Wo]); the kernel writes it where it lies.
at::Tensor fused_output(const at::Tensor& x, const ConvShape& s);
// The three convolutions on ATen (cuDNN on a GPU), for calls the fused kernel cannot take.
at::Tensor fused_chain(bool tucker, const ConvShape& s, const at::Tensor& x, const at::Tensor& first,
                       const at::Tensor& spatial, const at::Tensor& last, const std::optional<at::Tensor>& bias,
                       bool relu);

}  // namespace tdconv
