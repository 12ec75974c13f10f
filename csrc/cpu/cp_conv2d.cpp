// CPU kernel of tdconv::cp_conv2d, the CP-factorised convolution
//   y = last * depthwise_{spatial, stride, padding, dilation}(first * x) + bias
// (first: [R, C_in] 1x1 conv, spatial: [R, kh, kw] depthwise conv, last: [C_out, R] 1x1 conv).
//
// One op instead of three convolutions: the input is read once in channels-last order (free when it
// already is channels_last), and the images are processed in chunks whose R-channel intermediate
// fits in a cache-sized buffer: one GEMM into the factor space, the depthwise conv on that buffer
// (threads over output rows, vectorised over the R channels), one GEMM back with the bias folded
// in, written straight into the channels_last output. float16 / bfloat16 are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/ops.h"

namespace tdconv {
namespace {

constexpr int64_t kBufferBytes = 1 << 20;  // target size of one chunk's R-channel intermediate

// o[r] += a[r] * b[r]; the restrict qualifiers let the compiler vectorise it.
template <typename T>
inline void fma_row(T* __restrict__ o, const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  for (int64_t r = 0; r < n; ++r) o[r] += a[r] * b[r];
}

// Output rows [begin, end) of the depthwise conv on NHWC buffers.
template <typename T>
inline void depthwise_rows(const T* in, const T* wt, T* out, const ConvShape& s, int64_t begin, int64_t end) {
  const int64_t R = s.R;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / s.Ho, ho = row % s.Ho;
    T* orow = out + row * s.Wo * R;
    std::fill(orow, orow + s.Wo * R, T(0));
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t hi = ho * s.sh - s.ph + i * s.dh;
      if (hi < 0 || hi >= s.H) continue;
      const T* irow = in + (n * s.H + hi) * s.W * R;
      for (int64_t j = 0; j < s.kw; ++j) {
        // Output columns whose input column wo * sw + off lies inside the image.
        const int64_t off = j * s.dw - s.pw;
        const int64_t lo = off >= 0 ? 0 : (-off + s.sw - 1) / s.sw;
        const int64_t hi_col = s.W - 1 - off;
        if (hi_col < 0) continue;
        const int64_t hi_wo = std::min(s.Wo - 1, hi_col / s.sw);
        const T* wk = wt + (i * s.kw + j) * R;
        for (int64_t wo = lo; wo <= hi_wo; ++wo) fma_row(orow + wo * R, irow + (wo * s.sw + off) * R, wk, R);
      }
    }
  }
}

// The package is built for the baseline x86-64 ISA; these clones add AVX2+FMA (and AVX-512) versions
// of the hot loop, chosen at load time by the CPU that runs them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TDCONV_CPU_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define TDCONV_CPU_CLONES
#endif

TDCONV_CPU_CLONES void depthwise_rows_f32(const float* in, const float* wt, float* out, const ConvShape& s,
                                          int64_t begin, int64_t end) {
  depthwise_rows(in, wt, out, s, begin, end);
}

TDCONV_CPU_CLONES void depthwise_rows_f64(const double* in, const double* wt, double* out, const ConvShape& s,
                                          int64_t begin, int64_t end) {
  depthwise_rows(in, wt, out, s, begin, end);
}

template <typename T>
void depthwise_nhwc(const T* in, const T* wt, T* out, const ConvShape& s, int64_t n_images) {
  at::parallel_for(0, n_images * s.Ho, 1, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) {
      depthwise_rows_f32(in, wt, out, s, begin, end);
    } else {
      depthwise_rows_f64(in, wt, out, s, begin, end);
    }
  });
}

at::Tensor cp_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& first_in, const at::Tensor& spatial_in,
                         const at::Tensor& last_in, const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  const ConvShape s = check_cp_conv2d(x_in, first_in, spatial_in, last_in, bias_in, stride, padding, dilation);
  const auto out_dtype = x_in.scalar_type();
  const auto dtype = (out_dtype == at::kHalf || out_dtype == at::kBFloat16) ? at::kFloat : out_dtype;
  const auto x = x_in.to(dtype).permute({0, 2, 3, 1}).contiguous();  // NHWC; free for channels_last
  const auto first = first_in.to(dtype);
  const auto wt = spatial_in.to(dtype).permute({1, 2, 0}).contiguous();  // [kh, kw, R]
  const auto last_t = last_in.to(dtype).t();                               // [R, C_out]
  std::optional<at::Tensor> bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(dtype);

  auto out = at::empty({s.N, s.Ho, s.Wo, s.C_out}, x.options());
  if (s.N > 0 && s.Ho > 0 && s.Wo > 0) {
    const int64_t per_image = std::max<int64_t>(1, s.H * s.W * s.R * static_cast<int64_t>(x.element_size()));
    const int64_t chunk = std::clamp<int64_t>(kBufferBytes / per_image, 1, s.N);
    auto y1 = at::empty({chunk * s.H * s.W, s.R}, x.options());
    auto y2 = at::empty({chunk * s.Ho * s.Wo, s.R}, x.options());
    for (int64_t n0 = 0; n0 < s.N; n0 += chunk) {
      const int64_t nc = std::min(chunk, s.N - n0);
      auto xs = x.narrow(0, n0, nc).view({nc * s.H * s.W, s.C_in});
      auto a = y1.narrow(0, 0, nc * s.H * s.W);
      auto b = y2.narrow(0, 0, nc * s.Ho * s.Wo);
      at::mm_out(a, xs, first.t());
      AT_DISPATCH_FLOATING_TYPES(dtype, "cp_conv2d_depthwise", [&] {
        depthwise_nhwc<scalar_t>(a.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(),
                                 b.mutable_data_ptr<scalar_t>(), s, nc);
      });
      auto o = out.narrow(0, n0, nc).view({nc * s.Ho * s.Wo, s.C_out});
      if (bias.has_value()) {
        at::addmm_out(o, *bias, b, last_t);
      } else {
        at::mm_out(o, b, last_t);
      }
    }
  }
  return out.permute({0, 3, 1, 2}).to(out_dtype);  // NCHW shape, channels_last memory
}

}  // namespace

TORCH_LIBRARY_IMPL(tdconv, CPU, m) { m.impl("cp_conv2d", &cp_conv2d_cpu); }

}  // namespace tdconv
