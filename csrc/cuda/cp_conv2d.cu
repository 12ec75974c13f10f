// CUDA kernel of tdconv::cp_conv2d: y = last * depthwise_{kh x kw}(first * x) + bias.
//
// Two launches instead of three, and one intermediate round trip through memory instead of two:
//   1. y1 = x * first^T on the NHWC view of x (cuBLAS; free for channels_last inputs);
//   2. one kernel computes the depthwise conv *and* the 1x1 conv back with the bias: each block owns a
//      64-pixel x 64-channel tile of the NHWC output and walks the R factor channels 16 at a time,
//      computing the depthwise values of its pixels for those channels into shared memory (the second
//      intermediate never exists in global memory), then a register-tiled product with the matching
//      16 columns of `last` (4 x 4 outputs per thread, accumulated in the op-math type).
// float16 / bfloat16 accumulate in float32. This kernel has not run on a GPU yet.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/ops.h"

namespace tdconv {
namespace {

constexpr int kBM = 64;  // output pixels per block
constexpr int kBN = 64;  // output channels per block
constexpr int kBK = 16;  // factor channels per step
constexpr int kTM = 4;   // pixels per thread
constexpr int kTN = 4;   // output channels per thread
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256

template <typename T>
__global__ void __launch_bounds__(kThreads)
    depthwise_pointwise_kernel(const T* __restrict__ y1, const T* __restrict__ spatial, const T* __restrict__ last,
                               const T* __restrict__ bias, T* __restrict__ out, ConvShape s, bool relu) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t a_tile[kBK][kBM + 1];  // depthwise values [factor channel][pixel]
  __shared__ acc_t b_tile[kBK][kBN + 1];  // last^T [factor channel][output channel]
  const int tid = threadIdx.x;
  const int tx = tid % (kBN / kTN), ty = tid / (kBN / kTN);
  const int64_t m2 = s.N * s.Ho * s.Wo;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBN;
  acc_t acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);
  }
  for (int64_t r0 = 0; r0 < s.R_in; r0 += kBK) {
    // Depthwise values: consecutive threads take consecutive factor channels of one pixel, so that
    // their loads of the NHWC y1 are contiguous.
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int kl = e % kBK, pl = e / kBK;
      const int64_t p = p0 + pl, r = r0 + kl;
      acc_t v = acc_t(0);
      if (p < m2 && r < s.R_in) {
        const int64_t wo = p % s.Wo, ho = (p / s.Wo) % s.Ho, n = p / (s.Wo * s.Ho);
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t hi = ho * s.sh - s.ph + i * s.dh;
          if (hi < 0 || hi >= s.H) continue;
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t wi = wo * s.sw - s.pw + j * s.dw;
            if (wi < 0 || wi >= s.W) continue;
            v += static_cast<acc_t>(y1[((n * s.H + hi) * s.W + wi) * s.R_in + r]) *
                 static_cast<acc_t>(spatial[(r * s.kh + i) * s.kw + j]);
          }
        }
      }
      a_tile[kl][pl] = v;
    }
    for (int e = tid; e < kBN * kBK; e += kThreads) {
      const int kl = e % kBK, cl = e / kBK;
      const int64_t c = c0 + cl, r = r0 + kl;
      b_tile[kl][cl] = (c < s.C_out && r < s.R_in) ? static_cast<acc_t>(last[c * s.R_in + r]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      acc_t a[kTM], b[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) a[i] = a_tile[k][ty * kTM + i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) b[j] = b_tile[k][tx * kTN + j];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t p = p0 + ty * kTM + i;
    if (p >= m2) continue;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t c = c0 + tx * kTN + j;
      if (c >= s.C_out) continue;
      const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
      const acc_t v = acc[i][j] + b;
      out[p * s.C_out + c] = static_cast<T>(relu && v < acc_t(0) ? acc_t(0) : v);
    }
  }
}

at::Tensor cp_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& first, const at::Tensor& spatial_in,
                          const at::Tensor& last_in, const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const ConvShape s = check_factorized_conv2d("cp_conv2d", false, x_in, first, spatial_in, last_in, bias_in, stride,
                                              padding, dilation);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // gradients are the autograd formula's job
  auto out = at::empty({s.N, s.Ho, s.Wo, s.C_out}, x_in.options());
  if (s.N > 0 && s.Ho > 0 && s.Wo > 0) {
    const auto x = x_in.detach().permute({0, 2, 3, 1}).contiguous();  // NHWC; free for channels_last
    const auto y1 = at::mm(x.view({s.N * s.H * s.W, s.C_in}), first.detach().t());  // [N*H*W, R] (cuBLAS)
    const auto spatial = spatial_in.contiguous();
    const auto last = last_in.contiguous();
    at::Tensor bias;
    if (bias_in.has_value() && bias_in->defined()) bias = bias_in->contiguous();
    const int64_t m2 = s.N * s.Ho * s.Wo;
    const dim3 grid(static_cast<unsigned>((m2 + kBM - 1) / kBM), static_cast<unsigned>((s.C_out + kBN - 1) / kBN));
    TDCONV_CHECK(grid.x < (1u << 31) && grid.y < 65536, "tdconv::cp_conv2d: the output is too large for one launch");
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cp_conv2d_cuda", [&] {
      depthwise_pointwise_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          y1.const_data_ptr<scalar_t>(), spatial.const_data_ptr<scalar_t>(), last.const_data_ptr<scalar_t>(),
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), s, relu);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The input's layout (reads_nhwc, ops.h); for NCHW a copy: the kernel writes NHWC.
  out = out.permute({0, 3, 1, 2});
  return reads_nhwc(x_in) ? out : out.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(tdconv, CUDA, m) { m.impl("cp_conv2d", &cp_conv2d_cuda); }

}  // namespace tdconv
