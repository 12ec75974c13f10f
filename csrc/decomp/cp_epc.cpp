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
  TDCONV_CHECK_FLOAT(x, "x");
  TDCONV_CHECK(x.dim() >= 3, "tdconv::cp_epc: x must be [batch, I_0, ..., I_{N-1}] with N >= 2, got shape ",
              x.sizes());
  const int64_t N = x.dim() - 1, B = x.size(0);
  TDCONV_CHECK(B >= 1 && x.numel() > 0, "tdconv::cp_epc: x must not be empty, got shape ", x.sizes());
  TDCONV_CHECK(static_cast<int64_t>(factors.size()) == N, "tdconv::cp_epc: factors must hold ", N,
              " tensors (one per mode), got ", factors.size());
  const int64_t R = factors[0].size(-1);
  TDCONV_CHECK(weights.dim() == 2 && weights.size(0) == B && weights.size(1) == R,
              "tdconv::cp_epc: weights must have shape [", B, ", ", R, "], got ", weights.sizes());
  TDCONV_CHECK_TYPE(weights.scalar_type() == x.scalar_type(), "tdconv::cp_epc: weights has dtype ",
                   weights.scalar_type(), " but x has ", x.scalar_type());
  TDCONV_CHECK_SAME_DEVICE(x, weights, "x", "weights");
  for (int64_t n = 0; n < N; ++n) {
    TDCONV_CHECK(factors[n].dim() == 3 && factors[n].size(0) == B && factors[n].size(1) == x.size(n + 1) &&
                    factors[n].size(2) == R,
                "tdconv::cp_epc: factors[", n, "] must have shape [", B, ", ", x.size(n + 1), ", ", R, "], got ",
                factors[n].sizes());
    TDCONV_CHECK_TYPE(factors[n].scalar_type() == x.scalar_type(), "tdconv::cp_epc: factors[", n,
                     "] has dtype ", factors[n].scalar_type(), " but x has ", x.scalar_type());
    TDCONV_CHECK_SAME_DEVICE(x, factors[n], "x", "factor");
  }
  TDCONV_CHECK(delta.dim() == 1 && delta.size(0) == B, "tdconv::cp_epc: delta must have shape [", B, "], got ",
              delta.sizes());
  TDCONV_CHECK_SAME_DEVICE(x, delta, "x", "delta");
  TDCONV_CHECK(n_iter_max >= 1, "tdconv::cp_epc: n_iter_max must be >= 1, got ", n_iter_max);
  TDCONV_CHECK(tol >= 0, "tdconv::cp_epc: tol must be >= 0, got ", tol);
  TDCONV_CHECK(check_every >= 1, "tdconv::cp_epc: check_every must be >= 1, got ", check_every);

  // MTTKRPs by the dimension tree of cp_als: the largest mode is the root.
  int64_t root = 0;
  for (int64_t n = 1; n < N; ++n)
    if (x.size(n + 1) > x.size(root + 1)) root = n;
  const auto xp = x.movedim(root + 1, 1).contiguous();
  const int64_t Iroot = xp.size(1);
  const auto X0 = xp.view({B, Iroot, -1});
  const auto X0t = X0.transpose(1, 2);
  std::vector<int64_t> ysizes(xp.sizes().begin(), xp.sizes().end());
  ysizes.erase(ysizes.begin() + 1);
  ysizes.push_back(R);
  auto pos = [root](int64_t k) { return k < root ? k + 1 : k; };
  auto mttkrp = [&](const std::vector<at::Tensor>& U, int64_t k) {
    if (k == root) {
      std::vector<at::Tensor> others;
      for (int64_t m = 0; m < N; ++m)
        if (m != root) others.push_back(U[m]);
      return at::bmm(X0, khatri_rao(others));
    }
    auto M = at::bmm(X0t, U[root]).view(ysizes);
    for (int64_t m = N - 1; m >= 0; --m)
      if (m != k && m != root) M = mode_contract(M, U[m], pos(m));
    return M;
  };

  const auto dopt = x.options().dtype(at::kDouble);
  const auto norm_x2 = X0.to(at::kDouble).square().sum({1, 2});  // [B]
  const auto target = (norm_x2 - delta.to(at::kDouble).square()).clamp_min(0);  // c = ||X||^2 - delta^2
  std::vector<at::Tensor> U(N), G(N);
  for (int64_t k = 0; k < N; ++k) {
    U[k] = normalise_columns(factors[k]).first;
    G[k] = gram(U[k]);
  }
  auto lam = weights.clone();
  // Convergence on sum(lambda^2) / ||X||^2; the relative error history is kept alongside.
  SweepTracker tracker(B, n_iter_max, tol, check_every, x.options());
  auto errors = at::full({B, n_iter_max}, std::numeric_limits<double>::quiet_NaN(), dopt);
  at::Tensor M;
  for (int64_t it = 0; it < n_iter_max; ++it) {
    const auto U_old = U, G_old = G;
    const auto lam_old = lam;
    for (int64_t k = 0; k < N; ++k) {
      M = mttkrp(U, k);                                                     // [B, I_k, R]
      auto eig = at::linalg_eigh(hadamard_grams(G, k).to(at::kDouble));  // W = V diag(s) V^T
      auto s = std::get<0>(eig).clamp_min(0), V = std::get<1>(eig);
      auto Z = at::bmm(M.to(at::kDouble), V);                             // [B, I_k, R]
      auto z = Z.square().sum(1);                                         // [B, R]
      auto mu = secular_root(s, z, target);                               // [B]
      auto A = at::bmm(Z / (s + mu.unsqueeze(1)).unsqueeze(1), V.transpose(1, 2)).to(x.scalar_type());
      std::tie(U[k], lam) = normalise_columns(A);
      G[k] = gram(U[k]);
    }
    // Error from norms (as in cp_als), with <X, X^> from the last mode's MTTKRP.
    auto l = lam.to(at::kDouble);
    auto inner = ((M.to(at::kDouble) * U[N - 1].to(at::kDouble)).sum(1) * l).sum(-1);
    auto norm_hat2 = (at::bmm(l.unsqueeze(1), hadamard_grams(G, -1).to(at::kDouble)).squeeze(1) * l).sum(-1);
    auto err = ((norm_x2 - 2 * inner + norm_hat2).clamp_min(0) / norm_x2).sqrt();
    auto norms = l.square().sum(1) / norm_x2;
    const auto step = tracker.record(it, norms);
    errors.select(1, it).copy_(at::where(step, err, errors.select(1, it)));
    if (tracker.must_freeze(step)) {
      auto s3 = step.view({-1, 1, 1});
      for (int64_t k = 0; k < N; ++k) {
        U[k] = at::where(s3, U[k], U_old[k]);
        G[k] = at::where(s3, G[k], G_old[k]);
      }
      lam = at::where(step.view({-1, 1}), lam, lam_old);
    }
    if (!tracker.keep_going(it)) break;
  }
  return {lam, U, tracker.errors, tracker.n_iter, errors};
}

}  // namespace tdconv
