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
fused::Plan fused_plan(const ConvShape& s, at::ScalarType dt, bool tucker);
FusedOperands prepare_fused(bool tucker, const ConvShape& s, const at::Tensor& x, const at::Tensor& first,
                            const at::Tensor& spatial, const at::Tensor& last, const std::optional<at::Tensor>& bias);
// The NHWC output buffer [N, Ho, Wo, C_out], and the op's result from it in x's layout (reads_nhwc).
at::Tensor fused_output(const at::Tensor& x, const ConvShape& s);
at::Tensor fused_finish(const at::Tensor& x, const at::Tensor& out_nhwc);
// The three convolutions on ATen (cuDNN on a GPU), for calls the fused kernel cannot take.
at::Tensor fused_chain(bool tucker, const ConvShape& s, const at::Tensor& x, const at::Tensor& first,
                       const at::Tensor& spatial, const at::Tensor& last, const std::optional<at::Tensor>& bias,
                       bool relu);

}  // namespace tdconv
