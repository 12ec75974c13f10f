// CPU kernels of tdconv::cp_conv2d and tdconv::tucker_conv2d, the factorised convolutions
//   CP:       y = last * depthwise_{kh x kw}(first * x) + bias   (first [R, C_in], spatial [R, kh, kw])
//   Tucker-2: y = last * conv_{kh x kw}(core, first * x) + bias  (first [R_in, C_in], core [R_out, R_in, kh, kw])
// with last [C_out, R_out], the original stride / padding (zeros) / dilation on the spatial stage.
//
// One op instead of three convolutions. The output is cut into tiles of equal size (a few output
// rows of one image, or a group of whole small images), a multiple of the thread count of them and
// as many as keep a tile's intermediates within a cache-sized budget, and each thread runs the whole
// chain on its tiles: a GEMM into the factor space on the input rows the tile needs, the spatial
// stage (a vectorised depthwise loop for CP; for Tucker an indirect GEMM that reads the taps of each
// output pixel in place, its pixels grouped by the taps that reach the image so that none computes
// on padding), a GEMM back with the bias (and the fused ReLU), written straight into the output. The
// input and the output are NCHW, or NHWC for a channels_last input (the op returns its input's
// layout); the scratch intermediates are NHWC either way. The GEMMs
// run on our own register-blocked micro-kernel over weights packed once per call, or once per layer
// for a prepared layer (pack_factors / factorized_conv2d_prepacked; conv_kernels.h),
// with no im2col copy; only calls too small to repay packing (kPackMinPixels) leave their two 1x1
// stages to BLAS. The intermediates never leave the thread's scratch buffers, and there is one
// parallel region per call instead of one per conv. float16 / bfloat16 inputs are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/ops.h"

namespace tdconv {
namespace {

// A tile: images [n0, n0 + g), output rows [ho0, ho1) of each, computed from input rows [hi0, hi1).
// Either g == 1 (rows of one image) or the tile spans whole images (ho0 = 0, ho1 = Ho, hi0 = 0, hi1 = H).
struct TileTask {
  int64_t n0, g, ho0, ho1, hi0, hi1;
};

// Rows per register block of the GEMM micro-kernel (conv_kernels.h).
constexpr int64_t kMR = 6;

// Where the rows of a 1x1 stage's operand or result lie: row r is pixel r % P of image r / P of the
// tile, at base + (r / P) * image + (r % P) * pixel, its k-th element (column) `element` further on
// per k. NHWC: pixel = the row length, element = 1; NCHW: pixel = 1, element = H * W. The operand
// and the result of one product share P (A.P is used for both).
template <typename T>
struct RowMap {
  T* base;
  int64_t P, image, pixel, element;
};

// Weights B [taps][K][N] packed as column panels [ceil(N / NR)][taps][K][NR], zero-padded to NR
// columns, NR = 64 bytes of T; bias (padded likewise) or null.
template <typename T>
struct PackedB {
  const T* data;
  int64_t taps, K, N;
  const T* bias;
};

// The rows of an indirect GEMM, in blocks of up to kMR: block b has mr[b] rows and nt[b] taps; its row
// pointers are a[(b * max_taps + t) * kMR + i] (tap t, row i), the offsets of its taps' [K][NR]
// blocks in a panel b_off[b * max_taps + t], its output rows c[b * kMR + i].
template <typename T>
struct Indirection {
  int64_t max_taps = 0;
  std::vector<int64_t> mr, nt, b_off;
  std::vector<const T*> a;
  std::vector<T*> c;
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

// TDCONV_CPU_ISA=baseline in the environment (read once) takes the baseline loops on an AVX2 machine:
// the tests run them that way, and it rules them in or out when a result looks wrong.
bool cpu_has_avx2() {
#ifdef TDCONV_HAVE_AVX2_CLONE
  static const char* const isa = std::getenv("TDCONV_CPU_ISA");
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          !(isa != nullptr && std::string(isa) == "baseline");
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
void gemm_rows(const RowMap<const float>& A, int64_t m, const PackedB<float>& B, const RowMap<float>& C, bool relu) {
  TDCONV_ISA_CALL(gemm_rows_f32, A, m, B, C, relu);
}
void gemm_rows(const RowMap<const double>& A, int64_t m, const PackedB<double>& B, const RowMap<double>& C,
               bool relu) {
  TDCONV_ISA_CALL(gemm_rows_f64, A, m, B, C, relu);
}
void gemm_indirect(const Indirection<float>& ind, const PackedB<float>& B) {
  TDCONV_ISA_CALL(gemm_indirect_f32, ind, B);
}
void gemm_indirect(const Indirection<double>& ind, const PackedB<double>& B) {
  TDCONV_ISA_CALL(gemm_indirect_f64, ind, B);
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

// Cuts the output into tiles of about equal size, a multiple of the thread count of them (for balance),
// enough that each tile's intermediates fit a cache-sized budget; a tile never holds less than one
// output row.
std::vector<TileTask> make_tiles(const ConvShape& s, int64_t elem_size) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Scratch bytes per output pixel: y1 (about sh * sw input pixels) and y2.
  const int64_t per_px = elem_size * (s.R_in * s.sh * s.sw + s.R_out);
  constexpr int64_t kScratchBytes = 256 << 10;
  const int64_t max_px = std::max<int64_t>(1, kScratchBytes / std::max<int64_t>(1, per_px));
  const int64_t total_px = s.N * s.Ho * s.Wo;
  int64_t n_tiles = std::max(threads, (total_px + max_px - 1) / max_px);
  n_tiles = (n_tiles + threads - 1) / threads * threads;
  const int64_t target_px = std::max<int64_t>(1, (total_px + n_tiles - 1) / n_tiles);
  std::vector<TileTask> tiles;
  const int64_t img_px = s.Ho * s.Wo;
  if (img_px <= target_px) {  // groups of whole images, about n_tiles of them
    const int64_t g = (s.N + n_tiles - 1) / n_tiles;
    for (int64_t n0 = 0; n0 < s.N; n0 += g) tiles.push_back({n0, std::min(g, s.N - n0), 0, s.Ho, 0, s.H});
  } else {
    const int64_t per_image = std::max<int64_t>(1, (n_tiles + s.N - 1) / s.N);
    const int64_t rows = std::max<int64_t>(1, (s.Ho + per_image - 1) / per_image);
    for (int64_t n = 0; n < s.N; ++n) {
      for (int64_t ho0 = 0; ho0 < s.Ho; ho0 += rows) {
        const int64_t ho1 = std::min(s.Ho, ho0 + rows);
        const auto [hi0, hi1] = input_rows(s, ho0, ho1);
        tiles.push_back({n, 1, ho0, ho1, hi0, hi1});
      }
    }
  }
  return tiles;
}

// Output positions of one axis grouped by their live taps: [(taps [a, b), positions)].
using TapClasses = std::vector<std::pair<std::pair<int64_t, int64_t>, std::vector<int64_t>>>;

TapClasses tap_classes(int64_t o0, int64_t o1, int64_t stride, int64_t pad, int64_t dil, int64_t k, int64_t size) {
  TapClasses classes;
  for (int64_t o = o0; o < o1; ++o) {
    const auto taps = live_taps(o, o + 1, stride, pad, dil, k, size);
    auto it = std::find_if(classes.begin(), classes.end(), [&](const auto& c) { return c.first == taps; });
    if (it == classes.end()) {
      classes.push_back({taps, {}});
      it = classes.end() - 1;
    }
    it->second.push_back(o);
  }
  return classes;
}

// Everything one call shares between its tiles: the input and output (NHWC, or NCHW where `nchw`),
// and the packed factors.
template <typename T>
struct Plan {
  ConvShape s;
  bool tucker;
  bool nchw;           // x and out are NCHW (the packed path only; the BLAS path converts)
  bool relu;           // max(., 0) on the result
  const T* x;          // [N, H, W, C_in] or [N, C_in, H, W]
  PackedB<T> first;    // [1][C_in][R_in]; data null: BLAS on first_t instead (see kPackMinPixels)
  const T* spatial;    // CP: [kh, kw, R]
  PackedB<T> core;     // Tucker: [live kh taps * live kw taps][R_in][R_out]
  int64_t i0, j0, nj;  // Tucker: the first live taps of each axis, and the number of live kw taps
  PackedB<T> last;     // [1][R_out][C_out], with the bias; data null: BLAS on last_t, bias
  at::Tensor first_t, last_t, bias;  // the BLAS path: [C_in, R_in], [R_out, C_out], [C_out] or undefined
  T* out;              // [N, Ho, Wo, C_out] or [N, C_out, Ho, Wo]
  TapClasses col_classes;  // Tucker: the output columns by their live kw taps
};

// Packing a factor costs about one pass over it; below this many output pixels per call that is a
// sizeable part of the 1x1 stages (e.g. 512 -> 256 channels at 1x1 pixels), and those stages go to the
// BLAS torch was built with, on the factors in place, instead.
constexpr int64_t kPackMinPixels = 256;

// A [m, n] row-major matrix over memory owned elsewhere.
at::Tensor matrix(const void* p, int64_t m, int64_t n, const at::TensorOptions& o) {
  return at::from_blob(const_cast<void*>(p), {m, n}, o);
}

// C[m, N] = A[m, K] * B (+ bias, then max(., 0) where `relu`), for a 1x1 stage: packed B on the
// micro-kernel, rows where A and C map them; else BLAS, on contiguous NHWC rows (the BLAS path only
// runs on NHWC data).
template <typename T>
void stage_1x1(const RowMap<const T>& A, int64_t m, const PackedB<T>& B, const at::Tensor& b_t,
               const at::Tensor& bias, const RowMap<T>& C, bool relu) {
  if (B.data != nullptr) return gemm_rows(A, m, B, C, relu);
  const auto o = b_t.options();
  auto c = matrix(C.base, m, B.N, o);
  if (bias.defined()) {
    at::addmm_out(c, bias, matrix(A.base, m, B.K, o), b_t);
  } else {
    at::mm_out(c, matrix(A.base, m, B.K, o), b_t);
  }
  if (relu) c.clamp_min_(0);
}

// The indirect GEMM of a tile's Tucker core conv: its output pixels grouped by the taps that reach the
// image (so that no block computes on padding), in blocks of kMR pixels reading y1 in place.
template <typename T>
void core_blocks(const Plan<T>& p, const TileTask& t, const T* y1, T* y2, Indirection<T>& ind) {
  const ConvShape& s = p.s;
  const int64_t NR = 64 / sizeof(T), rows_in = t.hi1 - t.hi0, rows_out = t.ho1 - t.ho0;
  ind.max_taps = s.kh * s.kw;
  ind.mr.clear(), ind.nt.clear(), ind.b_off.clear(), ind.a.clear(), ind.c.clear();
  for (const auto& [rtaps, hos] : tap_classes(t.ho0, t.ho1, s.sh, s.ph, s.dh, s.kh, s.H)) {
    for (const auto& [ctaps, wos] : p.col_classes) {
      const int64_t nt = (rtaps.second - rtaps.first) * (ctaps.second - ctaps.first);
      if (nt == 0) continue;  // every tap reads padding: y2 = 0
      int64_t pending = 0;
      auto open_block = [&] {
        ind.mr.push_back(0);
        ind.nt.push_back(nt);
        ind.a.resize(ind.a.size() + ind.max_taps * kMR);
        ind.c.resize(ind.c.size() + kMR);
        for (int64_t i = rtaps.first, tap = 0; i < rtaps.second; ++i) {
          for (int64_t j = ctaps.first; j < ctaps.second; ++j, ++tap) {
            ind.b_off.push_back(((i - p.i0) * p.nj + j - p.j0) * s.R_in * NR);
          }
        }
        ind.b_off.resize(ind.mr.size() * ind.max_taps);
      };
      for (int64_t img = 0; img < t.g; ++img) {
        for (const int64_t ho : hos) {
          for (const int64_t wo : wos) {
            if (pending == 0) open_block();
            const int64_t blk = static_cast<int64_t>(ind.mr.size()) - 1;
            const T** a = ind.a.data() + blk * ind.max_taps * kMR;
            for (int64_t i = rtaps.first, tap = 0; i < rtaps.second; ++i) {
              const int64_t hi = ho * s.sh - s.ph + i * s.dh;
              const T* row = y1 + (img * rows_in + hi - t.hi0) * s.W * s.R_in;
              for (int64_t j = ctaps.first; j < ctaps.second; ++j, ++tap) {
                a[tap * kMR + pending] = row + (wo * s.sw - s.pw + j * s.dw) * s.R_in;
              }
            }
            ind.c[blk * kMR + pending] = y2 + ((img * rows_out + ho - t.ho0) * s.Wo + wo) * s.R_out;
            ind.mr[blk] = ++pending;
            if (pending == kMR) pending = 0;
          }
        }
      }
      if (pending != 0) {  // fill the unused rows of the last block with its first
        const int64_t blk = static_cast<int64_t>(ind.mr.size()) - 1;
        const T** a = ind.a.data() + blk * ind.max_taps * kMR;
        for (int64_t tap = 0; tap < nt; ++tap) std::fill(a + tap * kMR + pending, a + (tap + 1) * kMR, a[tap * kMR]);
        std::fill(ind.c.begin() + blk * kMR + pending, ind.c.begin() + (blk + 1) * kMR, ind.c[blk * kMR]);
      }
    }
  }
}

template <typename T>
void run_tile(const Plan<T>& p, const TileTask& t, T* y1, T* y2, Indirection<T>& ind) {
  const ConvShape& s = p.s;
  const int64_t P1 = (t.hi1 - t.hi0) * s.W, P2 = (t.ho1 - t.ho0) * s.Wo;  // pixels per image of the tile
  const int64_t m1 = t.g * P1, m2 = t.g * P2;
  // The tile's input rows and output rows, and the scratch rows (NHWC) they go to and come from.
  RowMap<const T> x_rows, y2_rows{y2, P2, P2 * s.R_out, s.R_out, 1};
  RowMap<T> y1_rows{y1, P1, P1 * s.R_in, s.R_in, 1}, out_rows;
  if (p.nchw) {
    x_rows = {p.x + t.n0 * s.C_in * s.H * s.W + t.hi0 * s.W, P1, s.C_in * s.H * s.W, 1, s.H * s.W};
    out_rows = {p.out + t.n0 * s.C_out * s.Ho * s.Wo + t.ho0 * s.Wo, P2, s.C_out * s.Ho * s.Wo, 1, s.Ho * s.Wo};
  } else {
    // Contiguous rows: a tile of several images holds them whole (P1 = H * W, P2 = Ho * Wo).
    x_rows = {p.x + ((t.n0 * s.H + t.hi0) * s.W) * s.C_in, P1, P1 * s.C_in, s.C_in, 1};
    out_rows = {p.out + ((t.n0 * s.Ho + t.ho0) * s.Wo) * s.C_out, P2, P2 * s.C_out, s.C_out, 1};
  }
  stage_1x1(x_rows, m1, p.first, p.first_t, at::Tensor(), y1_rows, false);
  if (p.tucker) {
    core_blocks(p, t, y1, y2, ind);
    // Pixels whose every tap reads padding have no block: their y2 rows are zeros.
    if (std::accumulate(ind.mr.begin(), ind.mr.end(), int64_t{0}) < m2) std::fill(y2, y2 + m2 * s.R_out, T(0));
    gemm_indirect(ind, p.core);
  } else {
    depthwise_tile(y1, p.spatial, y2, s, t);
  }
  stage_1x1(y2_rows, m2, p.last, p.last_t, p.bias, out_rows, p.relu);
}

template <typename T>
void run_tiles(const Plan<T>& p, const std::vector<TileTask>& tiles) {
  const ConvShape& s = p.s;
  int64_t m1 = 0, m2 = 0;
  for (const auto& t : tiles) {
    m1 = std::max(m1, t.g * (t.hi1 - t.hi0) * s.W);
    m2 = std::max(m2, t.g * (t.ho1 - t.ho0) * s.Wo);
  }
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread (the BLAS path)
    const std::unique_ptr<T[]> scratch(new T[m1 * s.R_in + m2 * s.R_out]);  // uninitialised
    Indirection<T> ind;
    for (int64_t i = begin; i < end; ++i) run_tile<T>(p, tiles[i], scratch.get(), scratch.get() + m1 * s.R_in, ind);
  });
}

// w [ti, tj, K, N] (any strides; taps t = (i, j)) as column panels [ceil(N / NR), ti * tj, K, NR],
// zero-padded; NR = 64 bytes of elements. A strided copy, parallel over the panels, in blocks of 16 k
// x NR columns with every tap of an element together (a core [R_out, R_in, kh, kw] has its taps
// adjacent): on weight-heavy layers at small batches packing is a sizeable part of the call.
template <typename T>
at::Tensor pack_panels(const at::Tensor& w) {
  constexpr int64_t NR = 64 / sizeof(T);
  const int64_t ti = w.size(0), tj = w.size(1), taps = ti * tj, K = w.size(2), N = w.size(3);
  const int64_t panels = (N + NR - 1) / NR;
  const int64_t si = w.stride(0), sj = w.stride(1), sk = w.stride(2), sn = w.stride(3);
  at::Tensor out = at::empty({panels, taps, K, NR}, w.options().memory_format(at::MemoryFormat::Contiguous));
  const T* src = w.const_data_ptr<T>();
  T* dst = out.mutable_data_ptr<T>();
  if (N % NR != 0) {  // the padding columns of the last panel
    T* last = dst + (panels - 1) * taps * K * NR;
    for (int64_t r = 0; r < taps * K; ++r) std::fill(last + r * NR + N % NR, last + (r + 1) * NR, T(0));
  }
  // Small factors are packed inline: a parallel region costs more than packing a few thousand values.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, taps * K * NR));
  std::vector<int64_t> tap_off(taps);
  for (int64_t t = 0; t < taps; ++t) tap_off[t] = (t / tj) * si + (t % tj) * sj;
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * NR, nr = std::min(NR, N - n0);
      T* d = dst + p * taps * K * NR;  // d[(t * K + k) * NR + j]
      for (int64_t k0 = 0; k0 < K; k0 += 16) {  // blocks of 16 k x NR columns: few cache lines live at a time
        const int64_t k1 = std::min(K, k0 + 16);
        for (int64_t j = 0; j < nr; ++j) {
          const T* col = src + (n0 + j) * sn;
          for (int64_t k = k0; k < k1; ++k) {
            for (int64_t t = 0; t < taps; ++t) d[(t * K + k) * NR + j] = col[k * sk + tap_off[t]];
          }
        }
      }
    }
  });
  return out;
}

at::Tensor pad_columns(const at::Tensor& b) {
  const int64_t nr = 64 / static_cast<int64_t>(b.element_size()), n = b.size(0);
  return at::constant_pad_nd(b, {0, (n + nr - 1) / nr * nr - n}).contiguous();
}

// The factors packed once for every call (tdconv::pack_factors): the 1x1 factors and the bias as the
// micro-kernel reads them, and the Tucker core over all its kh * kw taps (a call then reads the live
// ones in place). Undefined members are packed per call.
struct Prepacked {
  at::Tensor first, core, last, bias;
};

at::Tensor factorized_conv2d_cpu(bool tucker, const at::Tensor& x_in, const at::Tensor& first,
                                 const at::Tensor& spatial, const at::Tensor& last,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                                 const Prepacked& pre = {}) {
  const ConvShape s = check_factorized_conv2d(tucker ? "tucker_conv2d" : "cp_conv2d", tucker, x_in, first, spatial,
                                              last, bias, stride, padding, dilation);
  // The kernel reads its inputs' data; gradients are the autograd formula's job.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto out_dtype = x_in.scalar_type();
  const auto dtype = (out_dtype == at::kHalf || out_dtype == at::kBFloat16) ? at::kFloat : out_dtype;
  const bool nhwc_out = reads_nhwc(x_in);
  // Packing the 1x1 factors pays from kPackMinPixels output pixels on; below, their stages go to BLAS,
  // which runs on NHWC rows: an NCHW call that small converts its (small) input and output instead.
  const bool pack_1x1 = s.N * s.Ho * s.Wo >= kPackMinPixels;
  const bool nchw = !nhwc_out && pack_1x1;
  at::Tensor out = nchw ? at::empty({s.N, s.C_out, s.Ho, s.Wo}, x_in.options().dtype(dtype))
                        : at::empty({s.N, s.Ho, s.Wo, s.C_out}, x_in.options().dtype(dtype));
  if (s.N > 0 && s.Ho > 0 && s.Wo > 0) {
    // x in the order the kernel reads it: free when it already is (NCHW or channels_last, float32/64).
    const auto x = nchw ? x_in.to(dtype).contiguous() : x_in.to(dtype).permute({0, 2, 3, 1}).contiguous();
    const auto first_w = first.to(dtype).t();  // [C_in, R_in]
    const auto last_w = last.to(dtype).t();    // [R_out, C_out]
    at::Tensor bias_w;
    if (bias.has_value() && bias->defined()) bias_w = bias->to(dtype);
    // Tucker: the core [R_out, R_in, kh, kw] as [kh, kw, R_in, R_out]; CP: the filters as [kh, kw, R].
    const auto spatial_w = tucker ? spatial.to(dtype).permute({2, 3, 1, 0})
                                  : spatial.to(dtype).permute({1, 2, 0}).contiguous();
    // Tucker packs the taps that reach the image for some output pixel only (one of nine on 1x1 maps).
    const auto [i0, i1] = live_taps(0, s.Ho, s.sh, s.ph, s.dh, s.kh, s.H);
    const auto [j0, j1] = live_taps(0, s.Wo, s.sw, s.pw, s.dw, s.kw, s.W);
    const auto tiles = make_tiles(s, static_cast<int64_t>(c10::elementSize(dtype)));
    AT_DISPATCH_FLOATING_TYPES(dtype, "factorized_conv2d_cpu", [&] {
      using T = scalar_t;
      // Undefined where the 1x1 stages go to BLAS on first_w / last_w / bias_w instead.
      at::Tensor first_p, last_p, bias_p;
      if (pack_1x1) {
        first_p = pre.first.defined() ? pre.first : pack_panels<T>(first_w.expand({1, 1, -1, -1}));
        last_p = pre.last.defined() ? pre.last : pack_panels<T>(last_w.expand({1, 1, -1, -1}));
        if (bias_w.defined()) bias_p = pre.bias.defined() ? pre.bias : pad_columns(bias_w);
      }
      const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
      // A prepacked core holds every tap: the live ones are read where they are.
      const bool core_pre = tucker && pre.core.defined();
      const auto core_p = !tucker ? at::Tensor()
                          : core_pre ? pre.core
                                     : pack_panels<T>(spatial_w.slice(0, i0, i1).slice(1, j0, j1));
      Plan<T> p{s, tucker, nchw, relu, x.const_data_ptr<T>()};
      p.first = {ptr(first_p), 1, s.C_in, s.R_in, nullptr};
      p.last = {ptr(last_p), 1, s.R_out, s.C_out, ptr(bias_p)};
      p.first_t = first_w, p.last_t = last_w, p.bias = bias_w;
      if (tucker && core_pre) {
        p.core = {ptr(core_p), s.kh * s.kw, s.R_in, s.R_out, nullptr};
        p.i0 = 0, p.j0 = 0, p.nj = s.kw;
        p.col_classes = tap_classes(0, s.Wo, s.sw, s.pw, s.dw, s.kw, s.W);
      } else if (tucker) {
        p.core = {ptr(core_p), (i1 - i0) * (j1 - j0), s.R_in, s.R_out, nullptr};
        p.i0 = i0, p.j0 = j0, p.nj = j1 - j0;
        p.col_classes = tap_classes(0, s.Wo, s.sw, s.pw, s.dw, s.kw, s.W);
      } else {
        p.spatial = spatial_w.const_data_ptr<T>();
      }
      p.out = out.mutable_data_ptr<T>();
      run_tiles<T>(p, tiles);
    });
  }
  if (nchw) return out.to(out_dtype);
  out = out.permute({0, 3, 1, 2});  // NCHW shape, channels_last memory
  return (nhwc_out ? out : out.contiguous()).to(out_dtype);
}

at::Tensor cp_conv2d_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& spatial,
                         const at::Tensor& last, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  return factorized_conv2d_cpu(false, x, first, spatial, last, bias, stride, padding, dilation, relu);
}

at::Tensor tucker_conv2d_cpu(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                             const at::Tensor& last, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  return factorized_conv2d_cpu(true, x, first, core, last, bias, stride, padding, dilation, relu);
}

// tdconv::pack_factors: (first, core, last, bias) packed for factorized_conv2d_prepacked, in the
// dtype the kernel computes in (float32 for float16 / bfloat16); core empty for CP, bias empty where
// there is none. Checked like the op itself on a 1x1 probe of the factors' shapes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_factors(
    const at::Tensor& first, const at::Tensor& spatial, const at::Tensor& last,
    const std::optional<at::Tensor>& bias, bool tucker) {
  TDCONV_CHECK(first.dim() == 2 && last.dim() == 2 && spatial.dim() == (tucker ? 4 : 3),
               "tdconv::pack_factors: first [R_in, C_in], spatial ", tucker ? "[R_out, R_in, kh, kw]" : "[R, kh, kw]",
               " and last [C_out, R_out] expected, got ", first.sizes(), ", ", spatial.sizes(), ", ", last.sizes());
  TDCONV_CHECK(first.device().is_cpu(), "tdconv::pack_factors: CPU tensors expected, got ", first.device());
  const auto in_dtype = first.scalar_type();
  const auto dtype = (in_dtype == at::kHalf || in_dtype == at::kBFloat16) ? at::kFloat : in_dtype;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor first_p, core_p, last_p, bias_p;
  AT_DISPATCH_FLOATING_TYPES(dtype, "pack_factors", [&] {
    first_p = pack_panels<scalar_t>(first.to(dtype).t().expand({1, 1, -1, -1}));
    last_p = pack_panels<scalar_t>(last.to(dtype).t().expand({1, 1, -1, -1}));
    if (tucker) core_p = pack_panels<scalar_t>(spatial.to(dtype).permute({2, 3, 1, 0}));
  });
  if (bias.has_value() && bias->defined()) bias_p = pad_columns(bias->to(dtype));
  const auto none = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, first_p.options()); };
  return {first_p, none(core_p), last_p, none(bias_p)};
}

// tdconv::factorized_conv2d_prepacked: cp_conv2d / tucker_conv2d with the factors also given packed
// (pack_factors of the same factors, which the caller keeps in step). CPU, no autograd: the
// eval-mode call of a prepared layer.
at::Tensor factorized_conv2d_prepacked(const at::Tensor& x, const at::Tensor& first, const at::Tensor& spatial,
                                       const at::Tensor& last, const std::optional<at::Tensor>& bias,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       bool relu, bool tucker, const at::Tensor& first_p,
                                       const std::optional<at::Tensor>& core_p, const at::Tensor& last_p,
                                       const std::optional<at::Tensor>& bias_p) {
  const auto dtype = (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) ? at::kFloat : x.scalar_type();
  const int64_t nr = 64 / static_cast<int64_t>(c10::elementSize(dtype));
  const auto panels = [nr](int64_t n) { return (n + nr - 1) / nr; };
  // The packed shapes must be those of these factors: a stale or foreign pack would read out of bounds.
  TDCONV_CHECK(first.dim() == 2 && last.dim() == 2, "tdconv::factorized_conv2d_prepacked: first [R_in, C_in] and "
               "last [C_out, R_out] expected, got ", first.sizes(), " and ", last.sizes());
  const auto packed_as = [&](const at::Tensor& t, int64_t n, int64_t k, int64_t taps) {
    return t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 4 && t.is_contiguous() &&
           t.size(0) == panels(n) && t.size(1) == taps && t.size(2) == k && t.size(3) == nr;
  };
  TDCONV_CHECK(packed_as(first_p, first.size(0), first.size(1), 1),
               "tdconv::factorized_conv2d_prepacked: first_packed does not match first ", first.sizes(), " (",
               dtype, ")");
  TDCONV_CHECK(packed_as(last_p, last.size(0), last.size(1), 1),
               "tdconv::factorized_conv2d_prepacked: last_packed does not match last ", last.sizes(), " (", dtype,
               ")");
  TDCONV_CHECK(tucker || !(core_p.has_value() && core_p->defined()),
               "tdconv::factorized_conv2d_prepacked: core_packed must be None for CP (tucker=False)");
  Prepacked pre{first_p, at::Tensor(), last_p, at::Tensor()};
  if (tucker) {
    TDCONV_CHECK(core_p.has_value() && core_p->defined() && spatial.dim() == 4 &&
                     packed_as(*core_p, spatial.size(0), spatial.size(1), spatial.size(2) * spatial.size(3)),
                 "tdconv::factorized_conv2d_prepacked: core_packed does not match the core ", spatial.sizes());
    pre.core = *core_p;
  }
  if (bias.has_value() && bias->defined()) {
    TDCONV_CHECK(bias_p.has_value() && bias_p->defined() && bias_p->device().is_cpu() &&
                     bias_p->scalar_type() == dtype && bias_p->is_contiguous() && bias->dim() == 1 &&
                     bias_p->numel() == panels(bias->size(0)) * nr,
                 "tdconv::factorized_conv2d_prepacked: bias_packed does not match bias");
    pre.bias = *bias_p;
  }
  return factorized_conv2d_cpu(tucker, x, first, spatial, last, bias, stride, padding, dilation, relu, pre);
}

std::string cpu_isa() { return cpu_has_avx2() ? "avx2" : "baseline"; }

}  // namespace

TORCH_LIBRARY_IMPL(tdconv, CPU, m) {
  m.impl("cp_conv2d", &cp_conv2d_cpu);
  m.impl("tucker_conv2d", &tucker_conv2d_cpu);
  m.impl("pack_factors", &pack_factors);
  m.impl("factorized_conv2d_prepacked", &factorized_conv2d_prepacked);
}

// No tensor argument to dispatch on: one kernel for every backend.
TORCH_LIBRARY_IMPL(tdconv, CompositeImplicitAutograd, m) { m.impl("cpu_isa", &cpu_isa); }

}  // namespace tdconv
