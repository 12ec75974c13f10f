// Error preserving correction (EPC) of a CP decomposition, on ATen, batched, on the input's device.
//
// Phan, Tichavsky, Cichocki, "Error preserving correction: a method for CP decomposition at a target
// error bound", IEEE TSP 67(5), 2019; used for CNN compression by Phan et al., "Stable low-rank tensor
// decomposition for compression of convolutional neural network", ECCV 2020.
//
// Problem: given X and a bound delta (usually the error of a CP-ALS result), find unit-norm factor
// columns and weights lambda minimising sum_r lambda_r^2 subject to ||X - [[lambda; U_1..U_N]]|| <= delta.
// Mode by mode, with A = U_n diag(lambda) free and the other factors fixed (unit columns):
//   min ||A||_F^2  s.t.  ||X_(n) - A K^T||^2 <= delta^2,   K = Khatri-Rao of the other factors.
// With M = X_(n) K (MTTKRP), W = K^T K = Hadamard product of the other Gram matrices = V diag(s) V^T
// and Z = M V, the Lagrangian gives A = Z (diag(s) + mu I)^-1 V^T, and the constraint becomes the
// scalar secular equation
//   f(mu) = sum_r z_r (s_r + 2 mu) / (s_r + mu)^2 = ||X||^2 - delta^2,   z_r = ||Z[:, r]||^2,
// f decreasing in mu >= 0. f(0) is the best fit this mode can reach; when it cannot reach the bound
// the update is the least-squares (ALS) one. Otherwise mu is found by bisection on log(mu), batched
// on the device (no host synchronisation). Each update keeps the error at delta and cannot increase
// sum lambda^2, since the current iterate is feasible.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "../common/checks.h"
#include "../common/ops.h"
#include "cp_common.h"

namespace tdconv {
using namespace cp_detail;

namespace {

// The mu >= 0 [B] solving f(mu) = c (see above), in float64. s, z [B, R] (s >= 0), c [B].
at::Tensor secular_root(const at::Tensor& s, const at::Tensor& z, const at::Tensor& c) {
  const double eps = std::numeric_limits<double>::epsilon();
  auto f = [&](const at::Tensor& mu) {  // mu [B]
    auto m = mu.unsqueeze(1);
    return (z * (s + 2 * m) / (s + m).square()).sum(1);
  };
  auto smax = s.amax(1).clamp_min(std::numeric_limits<double>::min());
  // f(mu) <= 2 sum(z) / mu, so hi = 2 sum(z) / c satisfies f(hi) <= c; lo: a ridge of a few ulps.
  auto lo = (smax * (10 * eps)).log();
  auto hi = at::maximum((2 * z.sum(1) / c.clamp_min(std::numeric_limits<double>::min())).log(), lo);
  for (int i = 0; i < 64; ++i) {
    auto mid = 0.5 * (lo + hi);
    auto above = f(mid.exp()) > c;  // mu too small: too good a fit, too large a norm
    lo = at::where(above, mid, lo);
    hi = at::where(above, hi, mid);
  }
  auto mu = hi.exp();
  // Where even the smallest mu misses the bound (f(lo) <= c), take the least-squares step.
  return at::where(f(lo.exp()) <= c, lo.exp(), mu);
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> cp_epc(
    const at::Tensor& x, const at::Tensor& weights, at::TensorList factors, const at::Tensor& delta,
    int64_t n_iter_max, double tol, int64_t check_every) {
  const int64_t R = check_cp_arguments("cp_epc", "factors", x, factors, n_iter_max, tol, check_every);
  const int64_t N = x.dim() - 1, B = x.size(0);
  TDCONV_CHECK(weights.dim() == 2 && weights.size(0) == B && weights.size(1) == R,
               "tdconv::cp_epc: weights must have shape [", B, ", ", R, "], got ", weights.sizes());
  TDCONV_CHECK_TYPE(weights.scalar_type() == x.scalar_type(), "tdconv::cp_epc: weights has dtype ",
                    weights.scalar_type(), " but x has ", x.scalar_type());
  TDCONV_CHECK_SAME_DEVICE(x, weights, "x", "weights");
  TDCONV_CHECK(delta.dim() == 1 && delta.size(0) == B, "tdconv::cp_epc: delta must have shape [", B, "], got ",
               delta.sizes());
  TDCONV_CHECK_SAME_DEVICE(x, delta, "x", "delta");

  // MTTKRPs by the dimension tree of cp_als.
  DimTree tree(x, R, x.scalar_type());
  const auto dopt = x.options().dtype(at::kDouble);
  const auto& norm_x2 = tree.norm_x2();
  const auto target = (norm_x2 - delta.to(at::kDouble).square()).clamp_min(0);  // c = ||X||^2 - delta^2
  auto cur = start_iterate(factors, weights, x.scalar_type());
  auto& U = cur.U;
  auto& G = cur.G;
  // Convergence on sum(lambda^2) / ||X||^2; the relative error history is kept alongside.
  SweepTracker tracker(B, n_iter_max, tol, check_every, x.options());
  auto errors = at::full({B, n_iter_max}, std::numeric_limits<double>::quiet_NaN(), dopt);
  for (int64_t it = 0; it < n_iter_max; ++it) {
    const auto previous = cur;
    at::Tensor M;
    for (int64_t k = 0; k < N; ++k) {
      M = tree.mttkrp(U, k);                                               // [B, I_k, R]
      auto eig = at::linalg_eigh(hadamard_grams(G, k).to(at::kDouble));  // W = V diag(s) V^T
      auto s = std::get<0>(eig).clamp_min(0), V = std::get<1>(eig);
      auto Z = at::bmm(M.to(at::kDouble), V);                             // [B, I_k, R]
      auto z = Z.square().sum(1);                                         // [B, R]
      auto mu = secular_root(s, z, target);                               // [B]
      auto A = at::bmm(Z / (s + mu.unsqueeze(1)).unsqueeze(1), V.transpose(1, 2)).to(x.scalar_type());
      std::tie(U[k], cur.weights) = normalise_columns(A);
      G[k] = gram(U[k]);
    }
    auto err = rel_error_from_norms(norm_x2, M, U, G, cur.weights);
    auto norms = cur.weights.to(at::kDouble).square().sum(1) / norm_x2;
    const auto step = tracker.record(it, norms);
    errors.select(1, it).copy_(at::where(step, err, errors.select(1, it)));
    cur.keep_unless(tracker, step, previous);
    if (!tracker.keep_going(it)) break;
  }
  return {cur.weights, U, tracker.errors, tracker.n_iter, errors};
}

}  // namespace tdconv
