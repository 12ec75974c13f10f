// The host half of the CUDA fused convolutions (csrc/cuda/fused_conv.cu), compiled in every build:
// the operands in the layout the block program reads (fused_tiles.h), the launch plan, the plain
// ATen chain that a call too large for one block's shared memory runs instead, and the host
// emulation of the kernel (tdconv::_fused_conv2d_emulated), which runs the very block program of the
// kernel on the CPU, with kThreads threads per block and a barrier for __syncthreads (host_emulation.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "checks.h"
#include "fused_tiles.h"
#include "fused_conv.h"
#include "host_emulation.h"

namespace tdconv {

fused::Shape fused_shape(const ConvShape& s) {
  return {s.N, s.C_in, s.H, s.W, s.R_in, s.R_out, s.C_out, s.kh, s.kw, s.sh, s.sw, s.ph, s.pw, s.dh, s.dw, s.Ho, s.Wo};
}

bool fused_uses_wmma(at::ScalarType dt) { return dt == at::kHalf || dt == at::kBFloat16; }

fused::Plan fused_plan(const ConvShape& s, const at::Tensor& x, bool tucker) {
  const bool wmma = fused_uses_wmma(x.scalar_type());
  const int64_t acc = x.scalar_type() == at::kDouble ? 8 : 4;
  return fused::make_plan(fused_shape(s), wmma ? 2 : acc, acc, wmma, tucker, /*out_nchw=*/!reads_nhwc(x));
}

FusedOperands prepare_fused(bool tucker, const ConvShape& s, const at::Tensor& x, const at::Tensor& first,
                            const at::Tensor& spatial, const at::Tensor& last, const std::optional<at::Tensor>& bias) {
  FusedOperands o;
  // y1 = x * first^T as NHWC [N * H * W, R_in]. From an NCHW x, a batched product with each image
  // [C_in, H * W] read transposed (no transposed copy of x); from a channels_last x, one product.
  if (reads_nhwc(x)) {
    o.y1 = at::mm(x.detach().permute({0, 2, 3, 1}).reshape({s.N * s.H * s.W, s.C_in}), first.detach().t());
  } else {
    // first^T made contiguous once, so that no fallback of bmm copies its N-fold broadcast.
    const auto w = first.detach().t().contiguous().unsqueeze(0).expand({s.N, s.C_in, s.R_in});
    o.y1 = at::bmm(x.detach().reshape({s.N, s.C_in, s.H * s.W}).transpose(1, 2), w).reshape({s.N * s.H * s.W, s.R_in});
  }
  o.y1 = o.y1.contiguous();
  // Tucker: the core [R_out, R_in, kh, kw] as the B operand [kh * kw * R_in, R_out] of the implicit GEMM.
  o.spatial = tucker ? spatial.detach().permute({2, 3, 1, 0}).reshape({s.kh * s.kw * s.R_in, s.R_out}).contiguous()
                     : spatial.detach().reshape({s.R_in, s.kh * s.kw}).contiguous();
  o.last_t = last.detach().t().contiguous();  // [R_out, C_out]
  if (bias.has_value() && bias->defined()) o.bias = bias->detach().contiguous();
  return o;
}

at::Tensor fused_output(const at::Tensor& x, const ConvShape& s) {
  return reads_nhwc(x) ? at::empty({s.N, s.Ho, s.Wo, s.C_out}, x.options()).permute({0, 3, 1, 2})
                       : at::empty({s.N, s.C_out, s.Ho, s.Wo}, x.options());
}

at::Tensor fused_chain(bool tucker, const ConvShape& s, const at::Tensor& x, const at::Tensor& first,
                       const at::Tensor& spatial, const at::Tensor& last, const std::optional<at::Tensor>& bias,
                       bool relu) {
  const auto fmt = reads_nhwc(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto y1 = at::conv2d(x.detach(), first.detach().view({s.R_in, s.C_in, 1, 1}));
  const auto w = tucker ? spatial.detach() : spatial.detach().view({s.R_in, 1, s.kh, s.kw});
  auto y2 = at::conv2d(y1, w, {}, {s.sh, s.sw}, {s.ph, s.pw}, {s.dh, s.dw}, tucker ? 1 : s.R_in);
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->detach();
  auto out = at::conv2d(y2, last.detach().view({s.C_out, s.R_out, 1, 1}), b);
  if (relu) out = at::relu(out);
  return out.contiguous(fmt);
}

namespace {

template <typename T, bool kTucker, bool kWmma>
void emulate(const fused::Params<T>& P) {
  emulate_blocks(P.plan.blocks, fused::kThreads, P.plan.smem_bytes, fused::kAlign,
                 [&](int64_t b, int t, unsigned char* smem, HostCtx& ctx) {
                   fused::fused_block<T, kTucker, kWmma>(P, b, t, smem, ctx);
                 });
}

template <typename T>
void emulate_dispatch(const fused::Params<T>& P, bool tucker) {
  constexpr bool wmma = fused::kUsesWmma<T>;
  if (tucker)
    emulate<T, true, wmma>(P);
  else
    emulate<T, false, wmma>(P);
}

at::Tensor fused_conv2d_emulated(const at::Tensor& x, const at::Tensor& first, const at::Tensor& spatial,
                                 const at::Tensor& last, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, bool tucker,
                                 int64_t smem_limit) {
  const char* op = tucker ? "tucker_conv2d" : "cp_conv2d";
  const ConvShape s = check_factorized_conv2d(op, tucker, x, first, spatial, last, bias, stride, padding, dilation);
  TDCONV_CHECK(x.device().is_cpu(), "tdconv::_fused_conv2d_emulated: x must be on the CPU, got ", x.device());
  const fused::Plan plan = fused_plan(s, x, tucker);
  TDCONV_CHECK(plan.smem_bytes <= smem_limit, "tdconv::_fused_conv2d_emulated: one block needs ", plan.smem_bytes,
               " bytes of shared memory, more than smem_limit=", smem_limit,
               " (the CUDA op runs the unfused chain there)");
  auto out = fused_output(x, s);
  if (s.N == 0 || s.Ho == 0 || s.Wo == 0) return out;
  const FusedOperands o = prepare_fused(tucker, s, x, first, spatial, last, bias);
  out.fill_(std::numeric_limits<double>::quiet_NaN());  // an output element the program misses stays NaN
  fused::wmma_misaligned() = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_conv2d_emulated", [&] {
    fused::Params<scalar_t> P{o.y1.const_data_ptr<scalar_t>(), o.spatial.const_data_ptr<scalar_t>(),
                              o.last_t.const_data_ptr<scalar_t>(),
                              o.bias.defined() ? o.bias.const_data_ptr<scalar_t>() : nullptr,
                              out.mutable_data_ptr<scalar_t>(), fused_shape(s), plan, relu};
    emulate_dispatch<scalar_t>(P, tucker);
  });
  const int64_t bad = fused::wmma_misaligned();
  TDCONV_CHECK(bad == 0, "tdconv::_fused_conv2d_emulated: ", bad,
               " WMMA loads/stores broke the alignment rules (256-bit pointers, 16-byte strides)");
  return out;
}

// [blocks, rp, smem_bytes, wmma] of the CUDA launch for these arguments (shapes and dtype only).
std::vector<int64_t> fused_conv2d_plan(const at::Tensor& x, const at::Tensor& first, const at::Tensor& spatial,
                                       const at::Tensor& last, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, bool tucker) {
  const ConvShape s = check_factorized_conv2d(tucker ? "tucker_conv2d" : "cp_conv2d", tucker, x, first, spatial, last,
                                              std::nullopt, stride, padding, dilation);
  const fused::Plan p = fused_plan(s, x, tucker);
  return {p.blocks, p.rp, p.smem_bytes, p.wmma ? 1 : 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(tdconv, CPU, m) { m.impl("_fused_conv2d_emulated", &fused_conv2d_emulated); }
TORCH_LIBRARY_IMPL(tdconv, CompositeExplicitAutograd, m) { m.impl("_fused_conv2d_plan", &fused_conv2d_plan); }

}  // namespace tdconv
