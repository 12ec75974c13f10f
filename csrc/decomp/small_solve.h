// The small R x R step of a CP-ALS mode update fused into one block per batch member (CUDA kernel in
// csrc/cuda/small_solve.cu; host emulation tdconv::_cp_solve_emulated for the tests): what
// solve_normalised(hadamard_grams(G, skip), M, l2_reg) (cp_common.h) does in about fifteen launches:
//   V = the Hadamard product of the Grams but the skipped one; V += (l2_reg + 10 eps max diag V) I;
//   V = L L^T (Cholesky, in shared memory); U = M V^-1 row by row; U's columns normalised into lambda.
// A member whose V does not factor (a pivot that is not > 0) gets a NaN U, as on the ATen path.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/fused_tiles.h"  // TDCONV_HD

namespace tdconv {
namespace small_solve {

constexpr int kThreads = 128;
constexpr int64_t kMaxRank = 64;   // V [R, R] in shared memory: 32 KiB in float64
constexpr int kMaxGrams = 8;       // tensors of order <= 9

template <typename T>
struct Params {
  const T* grams[kMaxGrams];  // the Grams to multiply, each [B, R, R]
  int n_grams;
  const T* m;  // [B, I, R]
  T* u;        // [B, I, R]
  T* lam;      // [B, R]
  int64_t I, R;
  double l2_reg;
};

TDCONV_HD inline int64_t smem_bytes(int64_t R, int64_t elem) { return (R * R + 1) * elem; }

template <typename T, typename Ctx>
TDCONV_HD void block(const Params<T>& P, int64_t b, int tid, unsigned char* smem, Ctx& ctx) {
  const int64_t R = P.R, I = P.I;
  T* V = reinterpret_cast<T*>(smem);  // [R, R] row major; the Cholesky factor in its lower triangle
  T* failed = V + R * R;              // > 0 once a pivot is not positive
  const T eps = std::numeric_limits<T>::epsilon();
  for (int64_t e = tid; e < R * R; e += kThreads) {
    T v = P.grams[0][b * R * R + e];
    for (int g = 1; g < P.n_grams; ++g) v *= P.grams[g][b * R * R + e];
    V[e] = v;
  }
  ctx.sync();
  if (tid == 0) {
    T top = V[0];
    for (int64_t i = 1; i < R; ++i) top = V[i * R + i] > top ? V[i * R + i] : top;
    const T shift = top * (T(10) * eps) + static_cast<T>(P.l2_reg);
    for (int64_t i = 0; i < R; ++i) V[i * R + i] += shift;
    *failed = T(0);
  }
  ctx.sync();
  for (int64_t k = 0; k < R; ++k) {
    if (tid == 0) {
      const T d = V[k * R + k];
      if (!(d > T(0))) *failed = T(1);  // a NaN pivot too
      V[k * R + k] = d > T(0) ? std::sqrt(d) : T(1);
    }
    ctx.sync();
    for (int64_t i = k + 1 + tid; i < R; i += kThreads) V[i * R + k] /= V[k * R + k];
    ctx.sync();
    const int64_t n = R - k - 1;  // the trailing lower triangle: V[i][j] -= V[i][k] V[j][k], k < j <= i
    for (int64_t e = tid; e < n * n; e += kThreads) {
      const int64_t i = k + 1 + e / n, j = k + 1 + e % n;
      if (j <= i) V[i * R + j] -= V[i * R + k] * V[j * R + k];
    }
    ctx.sync();
  }
  const bool bad = *failed > T(0);
  T* u = P.u + b * I * R;
  const T* m = P.m + b * I * R;
  // U V = M, i.e. L L^T u^T = m^T per row: forward then backward substitution, in place in u.
  for (int64_t row = tid; row < I; row += kThreads) {
    T* x = u + row * R;
    const T* y = m + row * R;
    for (int64_t i = 0; i < R; ++i) {
      T s = y[i];
      for (int64_t j = 0; j < i; ++j) s -= V[i * R + j] * x[j];
      x[i] = s / V[i * R + i];
    }
    for (int64_t i = R - 1; i >= 0; --i) {
      T s = x[i];
      for (int64_t j = i + 1; j < R; ++j) s -= V[j * R + i] * x[j];
      x[i] = s / V[i * R + i];
    }
    if (bad)
      for (int64_t i = 0; i < R; ++i) x[i] = std::numeric_limits<T>::quiet_NaN();
  }
  ctx.sync();
  // Column norms into lambda; a zero column stays zero (divided by the smallest normal float).
  for (int64_t r = tid; r < R; r += kThreads) {
    T s = T(0);
    for (int64_t row = 0; row < I; ++row) s += u[row * R + r] * u[row * R + r];
    s = std::sqrt(s);
    P.lam[b * R + r] = s;
    const T scale = s > T(std::numeric_limits<float>::min()) ? s : T(std::numeric_limits<float>::min());
    for (int64_t row = 0; row < I; ++row) u[row * R + r] /= scale;
  }
}

}  // namespace small_solve
}  // namespace tdconv
