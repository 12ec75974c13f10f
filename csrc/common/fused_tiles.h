// The block program of the CUDA fused convolutions (csrc/cuda/fused_conv.cu), written once for the
// device and the host: every tile, index and bounds computation below runs on the GPU in the kernel
// and on the CPU in tdconv::_fused_conv2d_emulated (csrc/common/fused_plan.cpp), which runs each block
// with kThreads host threads and a barrier for __syncthreads, so that the tests check this exact code
// against the reference without a GPU.
//
// After y1 = x * first^T (cuBLAS, NHWC [pixels, R_in]), a block owns kBM output pixels and *all*
// output channels of them:
//   1. it computes its pixels' spatial stage y2 [kBM, R_out] once, into shared memory:
//      CP      the depthwise conv, elementwise;
//      Tucker  the core conv as an implicit GEMM (no im2col copy in memory): K = taps * R_in, the A
//              tile gathered from y1 per (pixel, tap, channel) with zeros outside the image;
//   2. it walks the output channels kBN at a time: out = y2 * last^T + bias (and the ReLU), K = R_out.
// So y2 never exists in global memory and is not recomputed per output-channel tile.
//
// The products run on a register-tiled SIMT loop in the op-math type (float32, float64), or on
// tensor cores (WMMA 16x16x16, float32 accumulation) for float16 / bfloat16. On the host the WMMA
// tile is a plain loop with the same memory semantics, and checks the alignment rules of
// load_matrix_sync / store_matrix_sync (pointers 256-bit aligned, ldm a multiple of 16 bytes).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define TDCONV_HD __host__ __device__
#define TDCONV_UNROLL _Pragma("unroll")
#else
#define TDCONV_HD
#define TDCONV_UNROLL
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define TDCONV_DEVICE_WMMA 1
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#if !defined(__CUDA_ARCH__)
#include <atomic>
#endif

namespace tdconv {
namespace fused {

constexpr int kBM = 64;   // output pixels per block
constexpr int kBN = 64;   // columns per product tile (R_out in stage 1 of Tucker, C_out in stage 2)
constexpr int kBK = 16;   // depth of one product step
constexpr int kTM = 4;    // SIMT: rows per thread
constexpr int kTN = 4;    // SIMT: columns per thread
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256
constexpr int kWarp = 32;
constexpr int kFrag = 16;  // WMMA tile edge
constexpr int kFragsPerWarp = (kBM / kFrag) * (kBN / kFrag) / (kThreads / kWarp);  // 2
constexpr int kAlign = 128;  // byte alignment of every shared-memory region
constexpr int kRowStep = kThreads / kBK;                 // Tucker's A gather: rows between a thread's rows
constexpr int kRowsPerThread = kBM * kBK / kThreads;     // and how many it has (4)
static_assert(kThreads % kBK == 0 && kRowsPerThread * kRowStep == kBM, "the A gather covers the tile exactly");
static_assert(kBK == kFrag, "one WMMA step per product step");
static_assert(kFragsPerWarp * (kThreads / kWarp) * kFrag * kFrag == kBM * kBN, "warps cover the tile");

// The op's geometry (ConvShape without the ATen dependency).
struct Shape {
  int64_t N, C_in, H, W, R_in, R_out, C_out, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

// The launch of one call: grid, shared-memory layout (element strides and byte offsets).
struct Plan {
  int64_t pixels;      // N * Ho * Wo
  int64_t blocks;      // ceil(pixels / kBM)
  int64_t rp;          // R_out rounded up to kBK: the width of y2
  int64_t ld_y2, ld_a, ld_b, ld_c;
  int64_t off_y2, off_a, off_b, off_c, off_rows, smem_bytes;
  bool wmma;
  bool out_nchw;  // the output is written NCHW (for an NCHW x), through the staging tile, pixels fastest
};

TDCONV_HD inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// `store_bytes`: the element size of the shared tiles (the input type for WMMA, the op-math type
// otherwise); `acc_bytes`: that of the accumulators (4, or 8 for float64). Leading dimensions are padded
// by 16 bytes' worth of elements (8 halves, 4 floats): shifts the banks of consecutive rows and keeps
// every WMMA tile 256-bit aligned. The staging tile of the accumulators is needed by WMMA (fragments
// are opaque) and by an NCHW output (written pixels fastest, so that a warp stores consecutive bytes).
TDCONV_HD inline Plan make_plan(const Shape& s, int64_t store_bytes, int64_t acc_bytes, bool wmma, bool tucker,
                                bool out_nchw) {
  Plan p{};
  p.wmma = wmma;
  p.out_nchw = out_nchw;
  p.pixels = s.N * s.Ho * s.Wo;
  p.blocks = (p.pixels + kBM - 1) / kBM;
  p.rp = round_up(s.R_out, kBK);
  const int64_t pad = 16 / store_bytes > 0 ? 16 / store_bytes : 1;
  p.ld_y2 = p.rp + pad;
  p.ld_a = kBK + pad;
  p.ld_b = kBN + pad;
  p.ld_c = kBN + 4;  // accumulator staging (a multiple of 16 bytes, as WMMA's store needs)
  int64_t off = 0;
  p.off_y2 = off;
  off = round_up(off + kBM * p.ld_y2 * store_bytes, kAlign);
  p.off_a = off;
  if (tucker) off = round_up(off + kBM * p.ld_a * store_bytes, kAlign);
  p.off_b = off;
  off = round_up(off + kBK * p.ld_b * store_bytes, kAlign);
  p.off_c = off;
  if (wmma || out_nchw) off = round_up(off + kBM * p.ld_c * (wmma ? 4 : acc_bytes), kAlign);
  p.off_rows = off;  // the output offset of each of the block's pixels (channel 0), -1 past the last
  off = round_up(off + kBM * static_cast<int64_t>(sizeof(int64_t)), kAlign);
  p.smem_bytes = off;
  return p;
}

template <typename T>
struct Params {
  const T* y1;       // [N, H, W, R_in]
  const T* spatial;  // CP: [R, kh * kw]; Tucker: the core as [kh * kw * R_in, R_out] (k = tap * R_in + ri)
  const T* last_t;   // last^T [R_out, C_out]
  const T* bias;     // [C_out] or null
  T* out;            // [N, Ho, Wo, C_out], or [N, C_out, Ho, Wo] where plan.out_nchw
  Shape s;
  Plan plan;
  bool relu;
};

// The products of float16 / bfloat16 run on tensor cores (WMMA); float32 / float64 on the SIMT loop.
template <typename T>
constexpr bool kUsesWmma = std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value;

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

#if !defined(__CUDA_ARCH__)
// Host emulation only: WMMA calls whose pointers or strides break the alignment rules.
inline std::atomic<int64_t>& wmma_misaligned() {
  static std::atomic<int64_t> count{0};
  return count;
}
#endif

// The 16x16 accumulator of one warp. Device (sm_80+): a WMMA fragment. Elsewhere: a loop that every
// lane runs on its own full copy; only lane 0 stores.
template <typename T>
struct WmmaTile {
#if defined(TDCONV_DEVICE_WMMA)
  using raw_t = std::conditional_t<std::is_same<T, c10::Half>::value, __half, __nv_bfloat16>;
  // The A operand of a step, loaded once and used for each of the warp's accumulators.
  struct AFrag {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, kFrag, kFrag, kFrag, raw_t, nvcuda::wmma::row_major> f;
    __device__ void load(const T* a, int64_t lda) {
      nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<const raw_t*>(a), static_cast<unsigned>(lda));
    }
  };
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kFrag, kFrag, kFrag, float> c;
  __device__ void zero() { nvcuda::wmma::fill_fragment(c, 0.0f); }
  __device__ void mma(const AFrag& a, const T* b, int64_t ldb) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, kFrag, kFrag, kFrag, raw_t, nvcuda::wmma::row_major> fb;
    nvcuda::wmma::load_matrix_sync(fb, reinterpret_cast<const raw_t*>(b), static_cast<unsigned>(ldb));
    nvcuda::wmma::mma_sync(c, a.f, fb, c);
  }
  __device__ void store(float* out, int64_t ldo, int /*lane*/) {
    nvcuda::wmma::store_matrix_sync(out, c, static_cast<unsigned>(ldo), nvcuda::wmma::mem_row_major);
  }
#else
  float c[kFrag][kFrag];
  TDCONV_HD void zero() {
    for (int i = 0; i < kFrag; ++i)
      for (int j = 0; j < kFrag; ++j) c[i][j] = 0.0f;
  }
  TDCONV_HD static void check(const void* p, int64_t ld, int64_t elem) {
#if !defined(__CUDA_ARCH__)
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ld * elem) % 16 != 0) wmma_misaligned()++;
#endif
  }
  struct AFrag {
    const T* p = nullptr;
    int64_t ld = 0;
    TDCONV_HD void load(const T* a, int64_t lda) {
      check(a, lda, sizeof(T));
      p = a;
      ld = lda;
    }
  };
  TDCONV_HD void mma(const AFrag& a, const T* b, int64_t ldb) {
    check(b, ldb, sizeof(T));
    for (int i = 0; i < kFrag; ++i)
      for (int k = 0; k < kFrag; ++k) {
        const float av = static_cast<float>(a.p[i * a.ld + k]);
        for (int j = 0; j < kFrag; ++j) c[i][j] += av * static_cast<float>(b[k * ldb + j]);
      }
  }
  TDCONV_HD void store(float* out, int64_t ldo, int lane) {
    check(out, ldo, sizeof(float));
    if (lane != 0) return;
    for (int i = 0; i < kFrag; ++i)
      for (int j = 0; j < kFrag; ++j) out[i * ldo + j] = c[i][j];
  }
#endif
};

// A kBM x kBN product tile accumulated over steps of depth kBK: C += A[kBM, kBK] B[kBK, kBN], A and B in
// shared memory (row major, strides lda / ldb). for_each(f) hands every finished element to f(row,
// col, value); all threads of the block call every member, with the same arguments (for_each
// synchronises in the WMMA form, and in the SIMT form when rows_fastest).
template <typename T, bool kWmma>
struct TileProduct;

template <typename T>
struct TileProduct<T, false> {  // SIMT: each thread owns kTM x kTN elements in registers
  using acc_t = typename OpMath<T>::type;
  acc_t acc[kTM][kTN];
  int tx, ty;
  TDCONV_HD explicit TileProduct(int tid) : tx(tid % (kBN / kTN)), ty(tid / (kBN / kTN)) {}
  TDCONV_HD void zero() {
    for (int i = 0; i < kTM; ++i)
      for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);
  }
  TDCONV_HD void step(const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb) {
TDCONV_UNROLL
    for (int k = 0; k < kBK; ++k) {
      acc_t av[kTM], bv[kTN];
TDCONV_UNROLL
      for (int i = 0; i < kTM; ++i) av[i] = a[(ty * kTM + i) * lda + k];
TDCONV_UNROLL
      for (int j = 0; j < kTN; ++j) bv[j] = b[k * ldb + tx * kTN + j];
TDCONV_UNROLL
      for (int i = 0; i < kTM; ++i)
TDCONV_UNROLL
        for (int j = 0; j < kTN; ++j) acc[i][j] += av[i] * bv[j];
    }
  }
  // Straight from the registers, or (rows_fastest) through the staging tile, consecutive threads on
  // consecutive rows.
  template <typename Ctx, typename F>
  TDCONV_HD void for_each(unsigned char* staging, int64_t ld_c, int tid, Ctx& ctx, bool rows_fastest, F&& f) {
    if (!rows_fastest) {
      for (int i = 0; i < kTM; ++i)
        for (int j = 0; j < kTN; ++j) f(ty * kTM + i, tx * kTN + j, acc[i][j]);
      return;
    }
    acc_t* st = reinterpret_cast<acc_t*>(staging);
    for (int i = 0; i < kTM; ++i)
      for (int j = 0; j < kTN; ++j) st[(ty * kTM + i) * ld_c + tx * kTN + j] = acc[i][j];
    ctx.sync();
    for (int e = tid; e < kBM * kBN; e += kThreads) f(e % kBM, e / kBM, st[(e % kBM) * ld_c + e / kBM]);
    ctx.sync();  // the staging tile is reused by the next product
  }
};

template <typename T>
struct TileProduct<T, true> {  // WMMA: warp w owns fragment row w % 4, fragment columns 2 (w / 4) + {0, 1}
  WmmaTile<T> frag[kFragsPerWarp];
  int warp, lane;
  TDCONV_HD explicit TileProduct(int tid) : warp(tid / kWarp), lane(tid % kWarp) {}
  TDCONV_HD int frag_row() const { return warp % (kBM / kFrag); }
  TDCONV_HD int frag_col(int f) const { return (warp / (kBM / kFrag)) * kFragsPerWarp + f; }
  TDCONV_HD void zero() {
    for (int f = 0; f < kFragsPerWarp; ++f) frag[f].zero();
  }
  TDCONV_HD void step(const T* a, int64_t lda, const T* b, int64_t ldb) {
    typename WmmaTile<T>::AFrag fa;
    fa.load(a + frag_row() * kFrag * lda, lda);
    for (int f = 0; f < kFragsPerWarp; ++f) frag[f].mma(fa, b + frag_col(f) * kFrag, ldb);
  }
  template <typename Ctx, typename F>
  TDCONV_HD void for_each(unsigned char* staging_bytes, int64_t ld_c, int tid, Ctx& ctx, bool rows_fastest, F&& f) {
    float* staging = reinterpret_cast<float*>(staging_bytes);
    for (int fi = 0; fi < kFragsPerWarp; ++fi)
      frag[fi].store(staging + frag_row() * kFrag * ld_c + frag_col(fi) * kFrag, ld_c, lane);
    ctx.sync();
    for (int e = tid; e < kBM * kBN; e += kThreads) {
      const int m = rows_fastest ? e % kBM : e / kBN, n = rows_fastest ? e / kBM : e % kBN;
      f(m, n, staging[m * ld_c + n]);
    }
    ctx.sync();  // the staging tile is reused by the next product
  }
};

// Pixel p (of N * Ho * Wo, NHWC order) -> (n, ho, wo).
struct Pixel {
  int64_t n, ho, wo;
};
TDCONV_HD inline Pixel pixel_of(int64_t p, const Shape& s) { return {p / (s.Ho * s.Wo), (p / s.Wo) % s.Ho, p % s.Wo}; }

// The y1 offset that output pixel q reads through tap (i, j), or -1 in the zero padding.
TDCONV_HD inline int64_t tap_offset(const Pixel& q, int64_t i, int64_t j, const Shape& s) {
  const int64_t hi = q.ho * s.sh - s.ph + i * s.dh, wi = q.wo * s.sw - s.pw + j * s.dw;
  if (hi < 0 || hi >= s.H || wi < 0 || wi >= s.W) return -1;
  return ((q.n * s.H + hi) * s.W + wi) * s.R_in;
}

// The program of block `block`, run by thread `tid` of kThreads; ctx.sync() is __syncthreads.
template <typename T, bool kTucker, bool kWmma, typename Ctx>
TDCONV_HD void fused_block(const Params<T>& P, int64_t block, int tid, unsigned char* smem, Ctx& ctx) {
  using acc_t = typename OpMath<T>::type;
  using S = std::conditional_t<kWmma, T, acc_t>;  // element type of the shared tiles
  const Shape& s = P.s;
  const Plan& pl = P.plan;
  S* y2 = reinterpret_cast<S*>(smem + pl.off_y2);
  S* a_tile = reinterpret_cast<S*>(smem + pl.off_a);
  S* b_tile = reinterpret_cast<S*>(smem + pl.off_b);
  unsigned char* staging = smem + pl.off_c;
  int64_t* out_row = reinterpret_cast<int64_t*>(smem + pl.off_rows);
  const int64_t p0 = block * kBM;
  const int64_t taps = s.kh * s.kw;
  TileProduct<T, kWmma> prod(tid);
  // Where each pixel's channel 0 goes in the output (-1: past the last pixel); channel c is c_stride
  // further. Read in stage 2, after the barriers of stage 1.
  const int64_t hw = s.Ho * s.Wo, c_stride = pl.out_nchw ? hw : 1;
  for (int m = tid; m < kBM; m += kThreads) {
    const int64_t p = p0 + m;
    out_row[m] = p >= pl.pixels ? -1 : pl.out_nchw ? (p / hw) * s.C_out * hw + p % hw : p * s.C_out;
  }

  // ---- 1. y2 [kBM, rp] of this block's pixels (rows past the last pixel and columns past R_out: 0)
  if constexpr (!kTucker) {
    for (int64_t e = tid; e < kBM * pl.rp; e += kThreads) {
      const int64_t r = e % pl.rp, m = e / pl.rp, p = p0 + m;
      acc_t v = acc_t(0);
      if (p < pl.pixels && r < s.R_in) {
        const Pixel q = pixel_of(p, s);
        for (int64_t i = 0; i < s.kh; ++i)
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t o = tap_offset(q, i, j, s);
            if (o >= 0) v += static_cast<acc_t>(P.y1[o + r]) * static_cast<acc_t>(P.spatial[r * taps + i * s.kw + j]);
          }
      }
      y2[m * pl.ld_y2 + r] = static_cast<S>(v);
    }
    ctx.sync();
  } else {
    const int64_t K = taps * s.R_in;
    // A: the implicit im2col of y1. Thread tid gathers column kl = tid % kBK of every A tile, in rows
    // tid / kBK + j * kRowStep: its rows' image coordinates and y1 offsets are decoded once here, its
    // column's (tap, channel) once per (n0, k0) step, so that no division by a runtime extent, and one
    // addition for the address, are left per element.
    const int kl = tid % kBK;
    int64_t row_h[kRowsPerThread], row_w[kRowsPerThread], row_off[kRowsPerThread];
TDCONV_UNROLL
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int64_t p = p0 + tid / kBK + j * kRowStep;
      const Pixel q = pixel_of(p < pl.pixels ? p : 0, s);
      row_h[j] = p < pl.pixels ? q.ho * s.sh - s.ph : -(s.H + s.kh * s.dh);  // a row past the end: never inside
      row_w[j] = q.wo * s.sw - s.pw;
      row_off[j] = ((q.n * s.H + row_h[j]) * s.W + row_w[j]) * s.R_in;  // of tap (0, 0); read only inside
    }
    for (int64_t n0 = 0; n0 < pl.rp; n0 += kBN) {
      prod.zero();
      for (int64_t k0 = 0; k0 < K; k0 += kBK) {
        // Consecutive threads read consecutive channels of one tap.
        const int64_t k = k0 + kl, tap = k < K ? k / s.R_in : 0, ri = k - tap * s.R_in;
        const int64_t ti = tap / s.kw, dh = ti * s.dh, dw = (tap - ti * s.kw) * s.dw;
        const int64_t tap_off = (dh * s.W + dw) * s.R_in + ri;
TDCONV_UNROLL
        for (int j = 0; j < kRowsPerThread; ++j) {
          const int64_t hi = row_h[j] + dh, wi = row_w[j] + dw;
          acc_t v = acc_t(0);
          if (k < K && hi >= 0 && hi < s.H && wi >= 0 && wi < s.W) v = static_cast<acc_t>(P.y1[row_off[j] + tap_off]);
          a_tile[(tid / kBK + j * kRowStep) * pl.ld_a + kl] = static_cast<S>(v);
        }
        // B: the core [K, R_out], columns n0..n0 + kBN.
        for (int64_t e = tid; e < kBK * kBN; e += kThreads) {
          const int64_t nl = e % kBN, kb = e / kBN, kg = k0 + kb, n = n0 + nl;
          b_tile[kb * pl.ld_b + nl] =
              (kg < K && n < s.R_out) ? static_cast<S>(static_cast<acc_t>(P.spatial[kg * s.R_out + n])) : S(acc_t(0));
        }
        ctx.sync();
        prod.step(a_tile, pl.ld_a, b_tile, pl.ld_b);
        ctx.sync();
      }
      prod.for_each(staging, pl.ld_c, tid, ctx, /*rows_fastest=*/false, [&](int m, int nl, acc_t v) {
        if (n0 + nl < pl.rp) y2[m * pl.ld_y2 + n0 + nl] = static_cast<S>(v);
      });
    }
    ctx.sync();
  }

  // ---- 2. out = y2 last^T + bias, kBN output channels at a time
  for (int64_t c0 = 0; c0 < s.C_out; c0 += kBN) {
    prod.zero();
    for (int64_t k0 = 0; k0 < pl.rp; k0 += kBK) {
      for (int64_t e = tid; e < kBK * kBN; e += kThreads) {
        const int64_t nl = e % kBN, kl = e / kBN, k = k0 + kl, c = c0 + nl;
        b_tile[kl * pl.ld_b + nl] =
            (k < s.R_out && c < s.C_out) ? static_cast<S>(static_cast<acc_t>(P.last_t[k * s.C_out + c])) : S(acc_t(0));
      }
      ctx.sync();
      prod.step(y2 + k0, pl.ld_y2, b_tile, pl.ld_b);
      ctx.sync();
    }
    prod.for_each(staging, pl.ld_c, tid, ctx, pl.out_nchw, [&](int m, int nl, acc_t v) {
      const int64_t row = out_row[m], c = c0 + nl;
      if (row < 0 || c >= s.C_out) return;
      if (P.bias != nullptr) v += static_cast<acc_t>(P.bias[c]);
      if (P.relu && v < acc_t(0)) v = acc_t(0);
      P.out[row + c * c_stride] = static_cast<T>(v);
    });
  }
}

}  // namespace fused
}  // namespace tdconv
