// CPU kernels of tdconv::cp_conv2d and tdconv::tucker_conv2d, the factorised convolutions
//   CP:       y = last * depthwise_{kh x kw}(first * x) + bias   (first [R, C_in], spatial [R, kh, kw])
//   Tucker-2: y = last * conv_{kh x kw}(core, first * x) + bias  (first [R_in, C_in], core [R_out, R_in, kh, kw])
// with last [C_out, R_out], the original stride / padding (zeros) / dilation on the spatial stage.
//
// One op instead of three convolutions. The output is cut into tiles (a few output rows of one
// image, or a few whole small images), about one per thread or as many as keep a tile's
// intermediates within a cache-sized budget, and each thread runs the whole chain on its tiles: a
// GEMM into the factor space on the input rows the tile needs, the spatial stage (a vectorised
// depthwise loop for CP; im2col and a GEMM for Tucker, over the taps that reach the image only), a
// GEMM back with the bias, written straight into the channels_last output. The intermediates never
// leave the thread's scratch buffers, and there is one parallel region per call instead of one per
// conv. float16 / bfloat16 inputs are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <memory>
#include <tuple>
#include <vector>

#include "../common/ops.h"

namespace tdconv {
namespace {

// Kernel taps [i0, i1) x [j0, j1): those that reach inside the image for some pixel of a tile.
struct TapRange {
  int64_t i0, i1, j0, j1;
  bool operator<(const TapRange& o) const { return std::tie(i0, i1, j0, j1) < std::tie(o.i0, o.i1, o.j0, o.j1); }
};

// A tile: images [n0, n0 + g), output rows [ho0, ho1) of each, computed from input rows [hi0, hi1)
// through the kernel taps `taps`. Either g == 1 (rows of one image) or the tile spans whole images
// (ho0 = 0, ho1 = Ho, hi0 = 0, hi1 = H).
struct TileTask {
  int64_t n0, g, ho0, ho1, hi0, hi1;
  TapRange taps;
};

// The vectorised loops, compiled for AVX2 + FMA and for the baseline ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TDCONV_HAVE_AVX2_CLONE 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "conv_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace baseline {
#include "conv_kernels.h"
}  // namespace baseline

bool cpu_has_avx2() {
#ifdef TDCONV_HAVE_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

#ifdef TDCONV_HAVE_AVX2_CLONE
#define TDCONV_ISA_CALL(fn, ...) (cpu_has_avx2() ? avx2::fn(__VA_ARGS__) : baseline::fn(__VA_ARGS__))
#else
#define TDCONV_ISA_CALL(fn, ...) baseline::fn(__VA_ARGS__)
#endif

void depthwise_tile(const float* in, const float* wt, float* out, const ConvShape& s, const TileTask& t) {
  TDCONV_ISA_CALL(depthwise_tile_f32, in, wt, out, s, t);
}
void depthwise_tile(const double* in, const double* wt, double* out, const ConvShape& s, const TileTask& t) {
  TDCONV_ISA_CALL(depthwise_tile_f64, in, wt, out, s, t);
}
void im2col_tile(const float* in, float* col, const ConvShape& s, const TileTask& t) {
  TDCONV_ISA_CALL(im2col_tile_f32, in, col, s, t);
}
void im2col_tile(const double* in, double* col, const ConvShape& s, const TileTask& t) {
  TDCONV_ISA_CALL(im2col_tile_f64, in, col, s, t);
}

// Input rows [hi0, hi1) that output rows [ho0, ho1) read.
std::pair<int64_t, int64_t> input_rows(const ConvShape& s, int64_t ho0, int64_t ho1) {
  const int64_t lo = std::max<int64_t>(0, ho0 * s.sh - s.ph);
  const int64_t hi = std::min<int64_t>(s.H, (ho1 - 1) * s.sh - s.ph + (s.kh - 1) * s.dh + 1);
  return {lo, std::max(lo, hi)};
}

// Taps [a, b) of one axis that reach [0, size) for some output position in [o0, o1).
std::pair<int64_t, int64_t> live_taps(int64_t o0, int64_t o1, int64_t stride, int64_t pad, int64_t dil, int64_t k,
                                      int64_t size) {
  int64_t a = k, b = 0;
  for (int64_t i = 0; i < k; ++i) {
    // positions o * stride - pad + i * dil for o in [o0, o1): an arithmetic sequence.
    const int64_t first = o0 * stride - pad + i * dil, last = (o1 - 1) * stride - pad + i * dil;
    const int64_t lo_o = first >= 0 ? o0 : o0 + (-first + stride - 1) / stride;
    if (lo_o < o1 && lo_o * stride - pad + i * dil < size && last >= 0) {
      a = std::min(a, i);
      b = i + 1;
    }
  }
  return {a, std::max(a, b)};
}

TapRange tile_taps(const ConvShape& s, int64_t ho0, int64_t ho1) {
  const auto [i0, i1] = live_taps(ho0, ho1, s.sh, s.ph, s.dh, s.kh, s.H);
  const auto [j0, j1] = live_taps(0, s.Wo, s.sw, s.pw, s.dw, s.kw, s.W);
  return {i0, i1, j0, j1};
}

// Cuts the output into tiles: one per thread where the intermediates fit the scratch budget, else
// as many as it takes; a tile never holds less than one output row.
std::vector<TileTask> make_tiles(const ConvShape& s, bool tucker, int64_t elem_size) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Scratch bytes per output pixel: y1 (about sh * sw input pixels), y2, and the im2col rows.
  const int64_t per_px = elem_size * (s.R_in * s.sh * s.sw + s.R_out + (tucker ? s.kh * s.kw * s.R_in : 0));
  constexpr int64_t kScratchBytes = 256 << 10;
  const int64_t max_px = std::max<int64_t>(s.Wo, kScratchBytes / std::max<int64_t>(1, per_px));
  const int64_t total_px = s.N * s.Ho * s.Wo;
  const int64_t target_px = std::clamp<int64_t>((total_px + threads - 1) / threads, std::min<int64_t>(96, max_px),
                                                max_px);
  std::vector<TileTask> tiles;
  const int64_t img_px = s.Ho * s.Wo;
  if (img_px <= target_px) {
    const int64_t g = std::max<int64_t>(1, target_px / img_px);
    const TapRange taps = tile_taps(s, 0, s.Ho);
    for (int64_t n0 = 0; n0 < s.N; n0 += g) tiles.push_back({n0, std::min(g, s.N - n0), 0, s.Ho, 0, s.H, taps});
  } else {
    const int64_t rows = std::max<int64_t>(1, target_px / s.Wo);
    for (int64_t n = 0; n < s.N; ++n) {
      for (int64_t ho0 = 0; ho0 < s.Ho; ho0 += rows) {
        const int64_t ho1 = std::min(s.Ho, ho0 + rows);
        const auto [hi0, hi1] = input_rows(s, ho0, ho1);
        tiles.push_back({n, 1, ho0, ho1, hi0, hi1, tile_taps(s, ho0, ho1)});
      }
    }
  }
  return tiles;
}

// A [m, n] row-major matrix over memory owned elsewhere.
at::Tensor matrix(const void* p, int64_t m, int64_t n, const at::TensorOptions& o) {
  return at::from_blob(const_cast<void*>(p), {m, n}, o);
}

// Everything one call shares between its tiles. GEMM operands are transposed views (B = W^T).
struct Plan {
  ConvShape s;
  bool tucker;
  at::Tensor x;         // NHWC input
  at::Tensor first_t;   // [C_in, R_in]
  at::Tensor spatial;   // CP: [kh, kw, R]
  std::map<TapRange, at::Tensor> core_t;  // Tucker: [taps' * R_in, R_out] per range of live taps
  at::Tensor last_t;    // [R_out, C_out]
  at::Tensor bias;      // [C_out] or undefined
  at::Tensor out;       // NHWC output
};

template <typename T>
void run_tile(const Plan& p, const TileTask& t, T* y1p, T* y2p, T* colp) {
  const ConvShape& s = p.s;
  const auto o = p.x.options();
  const int64_t m1 = t.g * (t.hi1 - t.hi0) * s.W;
  const int64_t m2 = t.g * (t.ho1 - t.ho0) * s.Wo;
  const auto x = matrix(p.x.const_data_ptr<T>() + ((t.n0 * s.H + t.hi0) * s.W) * s.C_in, m1, s.C_in, o);
  auto y1 = matrix(y1p, m1, s.R_in, o), y2 = matrix(y2p, m2, s.R_out, o);
  at::mm_out(y1, x, p.first_t);
  if (p.tucker) {
    const at::Tensor& core_t = p.core_t.at(t.taps);
    im2col_tile(y1p, colp, s, t);
    at::mm_out(y2, matrix(colp, m2, core_t.size(0), o), core_t);
  } else {
    depthwise_tile(y1p, p.spatial.const_data_ptr<T>(), y2p, s, t);
  }
  auto out = matrix(p.out.mutable_data_ptr<T>() + ((t.n0 * s.Ho + t.ho0) * s.Wo) * s.C_out, m2, s.C_out, o);
  if (p.bias.defined()) {
    at::addmm_out(out, p.bias, y2, p.last_t);
  } else {
    at::mm_out(out, y2, p.last_t);
  }
}

template <typename T>
void run_tiles(const Plan& p, const std::vector<TileTask>& tiles) {
  const ConvShape& s = p.s;
  int64_t m1 = 0, m2 = 0;
  for (const auto& t : tiles) {
    m1 = std::max(m1, t.g * (t.hi1 - t.hi0) * s.W);
    m2 = std::max(m2, t.g * (t.ho1 - t.ho0) * s.Wo);
  }
  const int64_t col_width = p.tucker ? s.kh * s.kw * s.R_in : 0;
  // The BLAS calls inside the region run single-threaded: the threads are the tiles'.
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread
    const std::unique_ptr<T[]> scratch(new T[m1 * s.R_in + m2 * s.R_out + m2 * col_width]);  // uninitialised
    T* y1 = scratch.get();
    for (int64_t i = begin; i < end; ++i) run_tile<T>(p, tiles[i], y1, y1 + m1 * s.R_in, y1 + m1 * s.R_in + m2 * s.R_out);
  });
}

at::Tensor factorized_conv2d_cpu(bool tucker, const at::Tensor& x_in, const at::Tensor& first,
                                 const at::Tensor& spatial, const at::Tensor& last,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  const ConvShape s = check_factorized_conv2d(tucker ? "tucker_conv2d" : "cp_conv2d", tucker, x_in, first, spatial,
                                              last, bias, stride, padding, dilation);
  // The kernel computes with ATen ops on views of its inputs; gradients are the autograd formula's job.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto out_dtype = x_in.scalar_type();
  const auto dtype = (out_dtype == at::kHalf || out_dtype == at::kBFloat16) ? at::kFloat : out_dtype;
  Plan p{s, tucker};
  p.out = at::empty({s.N, s.Ho, s.Wo, s.C_out}, x_in.options().dtype(dtype));
  if (s.N > 0 && s.Ho > 0 && s.Wo > 0) {
    p.x = x_in.detach().to(dtype).permute({0, 2, 3, 1}).contiguous();  // NHWC; free for channels_last
    p.first_t = first.detach().to(dtype).t();
    p.last_t = last.detach().to(dtype).t();
    if (bias.has_value() && bias->defined()) p.bias = bias->detach().to(dtype);
    const auto tiles = make_tiles(s, tucker, static_cast<int64_t>(c10::elementSize(dtype)));
    if (tucker) {
      const auto core = spatial.detach().to(dtype).permute({0, 2, 3, 1});  // [R_out, kh, kw, R_in]
      for (const auto& t : tiles) {
        const TapRange& r = t.taps;
        if (p.core_t.count(r)) continue;
        p.core_t[r] = core.slice(1, r.i0, r.i1).slice(2, r.j0, r.j1).reshape({s.R_out, -1}).t().contiguous();
      }
    } else {
      p.spatial = spatial.detach().to(dtype).permute({1, 2, 0}).contiguous();  // [kh, kw, R]
    }
    AT_DISPATCH_FLOATING_TYPES(dtype, "factorized_conv2d_cpu", [&] { run_tiles<scalar_t>(p, tiles); });
  }
  return p.out.permute({0, 3, 1, 2}).to(out_dtype);  // NCHW shape, channels_last memory
}

at::Tensor cp_conv2d_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& spatial,
                         const at::Tensor& last, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  return factorized_conv2d_cpu(false, x, first, spatial, last, bias, stride, padding, dilation);
}

at::Tensor tucker_conv2d_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                             const at::Tensor& last, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  return factorized_conv2d_cpu(true, x, first, core, last, bias, stride, padding, dilation);
}

}  // namespace

TORCH_LIBRARY_IMPL(tdconv, CPU, m) {
  m.impl("cp_conv2d", &cp_conv2d_cpu);
  m.impl("tucker_conv2d", &tucker_conv2d_cpu);
}

}  // namespace tdconv
