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
// and Z = M V, the Lagrangian gives A = Z (diag(s) + mu I)^-1 V^T. The least-squares update (mu = 0)
// fits best; shrinking it by mu > 0 raises the residual by
//   P = sum_r (z_r / s_r) (mu / (s_r + mu))^2,   z_r = ||Z[:, r]||^2,
// and the constraint is the scalar secular equation P = d, d = delta^2 - (least-squares residual)
// = sum_r z_r / s_r - (||X||^2 - delta^2). Where d <= 0 this mode cannot reach the bound and the
// update is the least-squares (ALS) one. In kappa = 1 / mu, P(kappa) = sum_r (z_r / s_r) / (1 + s_r
// kappa)^2 has the form of the trust-region secular function of More & Sorensen (SIAM J. Sci. Stat.
// Comput. 4(3), 1983), for which 1 / sqrt(P(kappa)) is concave and increasing: Newton's method on
// 1 / sqrt(P) - 1 / sqrt(d) from kappa = 0 (where P = sum z / s >= d) increases monotonically to the
// root and converges quadratically, to rounding in a handful of steps. A fixed number of steps is run,
// batched on the device (the solve itself needs no host synchronisation; the symmetric eigendecompositions
// that precede it check their status on the host, once per mode and sweep on CUDA). Each update keeps the error at delta and cannot
// increase sum lambda^2, since the current iterate is feasible.
//
// Those block updates only move within the thin slice of each block that keeps the error at delta,
// so plain sweeps crawl once ALS has converged. Each sweep therefore starts from an extrapolation of
// the last two accepted iterates, U + beta (U - U_prev) (columns renormalised), as Ang & Gillis
// ("Accelerating nonnegative matrix factorization algorithms using extrapolation", Neural
// Computation 31(2), 2019) do for ALS: the sweep is accepted if it ends within the bound with a
// smaller sum lambda^2 than the last accepted iterate, and beta grows; otherwise it is discarded,
// beta shrinks and the next sweep is a plain one from the last accepted iterate (which cannot be
// worse). beta, acceptance and convergence are per batch member, on the device; a discarded sweep
// counts as a sweep and repeats the last values in the histories, and convergence (a change of
// sum lambda^2 / ||X||^2 below tol) is only tested on accepted sweeps.
//
// The iterate (factors, weights, Gram matrices), the eigendecompositions and the secular equation are
// float64 whatever the input's dtype; only the MTTKRPs, the GEMMs of the size of the tensor, run in
// the input's dtype (from the float64 factors). Once ALS has converged in float32 the slack the
// updates move in is at the level of float32 rounding: factors rounded to float32 after every update
// would make the iteration wander on that noise.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "../common/checks.h"
#include "../common/ops.h"
#include "cp_common.h"

namespace tdconv {
using namespace cp_detail;

namespace {

// Newton steps on the secular equation: enough for float64 rounding even for a W with eigenvalues
// spread over 15 decades and d / P(0) down to 1e-17 (most cases need 3 to 5).
constexpr int kNewtonSteps = 10;
// Extrapolation (Ang & Gillis 2019): initial beta and its cap, the factor beta shrinks by on a
// rejected sweep, and the factors beta and its cap grow by on an accepted one (the cap stays <= 1).
constexpr double kBeta0 = 0.5, kBetaMax0 = 1.0, kShrink = 1.5, kGrow = 1.05, kGrowMax = 1.01;

// kappa [B] with P(kappa) = sum (z / s) / (1 + s kappa)^2 = d, for d [B] > 0 (other members: any
// finite value). s, z [B, R], s > 0.
at::Tensor secular_kappa(const at::Tensor& s, const at::Tensor& z, const at::Tensor& d) {
  const auto w = z / s;
  const auto d_safe = d.clamp_min(std::numeric_limits<double>::min());
  auto kappa = at::zeros_like(d);
  for (int i = 0; i < kNewtonSteps; ++i) {
    auto u = (s * kappa.unsqueeze(1)).add_(1).reciprocal_();  // 1 / (1 + s kappa)
    auto u2 = u.square();
    auto p = (w * u2).sum(1);                                // P(kappa)
    auto q = (z * u2).mul_(u).sum(1);                        // -P'(kappa) / 2
    kappa = kappa + p * (p / d_safe).sqrt_().sub_(1) / q.clamp_min(std::numeric_limits<double>::min());
  }
  return kappa;
}

// One EPC update of mode k from the iterate `it`, in place; returns whether the mode reached delta
// ([B] bool). `target` = ||X||^2 - delta^2 [B].
at::Tensor update_mode(DimTree& tree, CpIterate& it, int64_t k, const at::Tensor& target, at::Tensor& M) {
  M = tree.mttkrp(it.U, k).to(at::kDouble);                         // [B, I_k, R]
  auto eig = at::linalg_eigh(hadamard_grams(it.G, k));              // W = V diag(s) V^T
  auto s = std::get<0>(eig), V = std::get<1>(eig);
  // A W that is singular up to rounding gets a ridge of a few ulps of its largest eigenvalue.
  const auto ridge = s.amax(1, true).clamp_min(std::numeric_limits<double>::min()) *
                     (10 * std::numeric_limits<double>::epsilon());
  s = at::maximum(s, ridge);
  auto Z = at::bmm(M, V);                                            // [B, I_k, R]
  auto z = Z.square().sum(1);                                        // [B, R]
  auto d = (z / s).sum(1) - target;                                  // slack of the least-squares update
  auto reach = d > 0;
  auto kappa = secular_kappa(s, z, d).unsqueeze(1);
  // 1 / (s + mu) = kappa / (1 + s kappa); the least-squares 1 / s where the bound is out of reach.
  auto scale = at::where(reach.unsqueeze(1), kappa / (1 + s * kappa), s.reciprocal());
  std::tie(it.U[k], it.weights) = normalise_columns(at::bmm(Z * scale.unsqueeze(1), V.transpose(1, 2)));
  it.G[k] = gram(it.U[k]);
  return reach;
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

  const auto dopt = x.options().dtype(at::kDouble);
  DimTree tree(x, R);
  const auto& norm_x2 = tree.norm_x2();
  const auto target = (norm_x2 - delta.to(at::kDouble).square()).clamp_min(0);  // ||X||^2 - delta^2
  auto cur = start_iterate(factors, weights, at::kDouble);  // the last accepted iterate
  auto before = cur.U;                                      // the one accepted before it
  auto start = cur;                                         // where the next sweep starts
  auto best = cur.weights.square().sum(1) / norm_x2;        // sum lambda^2 / ||X||^2 of `cur`
  auto cur_err = at::full({B}, std::numeric_limits<double>::quiet_NaN(), dopt);
  auto beta = at::full({B}, kBeta0, dopt), beta_max = at::full({B}, kBetaMax0, dopt);
  auto extrapolated = at::zeros({B}, x.options().dtype(at::kBool));  // does `start` differ from `cur`?

  // Convergence on sum(lambda^2) / ||X||^2; the relative error history is kept alongside.
  SweepTracker tracker(B, n_iter_max, tol, check_every, x.options());
  auto errors = at::full({B, n_iter_max}, std::numeric_limits<double>::quiet_NaN(), dopt);
  for (int64_t it = 0; it < n_iter_max; ++it) {
    auto next = start;
    at::Tensor M, reach;
    for (int64_t k = 0; k < N; ++k) reach = update_mode(tree, next, k, target, M);
    const auto err = rel_error_from_norms(norm_x2, M, next.U, next.G, next.weights);
    const auto norms = next.weights.square().sum(1) / norm_x2;
    // A plain sweep is always taken; an extrapolated one if it ends within the bound, smaller.
    const auto accept = extrapolated.logical_not() | (reach & (norms <= best));
    const auto step = tracker.record(it, at::where(accept, norms, best), accept);
    const auto take = step & accept, reject = step & accept.logical_not();
    const auto t3 = take.view({-1, 1, 1});
    for (int64_t k = 0; k < N; ++k) before[k] = at::where(t3, cur.U[k], before[k]);
    next.keep_unless(tracker, take, cur);
    cur = next;
    best = at::where(take, norms, best);
    cur_err = at::where(take, err, cur_err);
    errors.select(1, it).copy_(at::where(step, cur_err, errors.select(1, it)));

    const auto grown = take & extrapolated;
    const auto new_max = at::where(reject, beta, at::where(grown, (beta_max * kGrowMax).clamp_max(1), beta_max));
    beta = at::where(reject, beta / kShrink, at::where(grown, at::minimum(beta * kGrow, beta_max), beta));
    beta_max = new_max;
    // Extrapolate from a feasible accepted iterate; after a rejection, or while the bound is out of
    // reach, the next sweep starts from `cur` itself. Mode 0's update does not read its own factor.
    extrapolated = take & reach;
    start = cur;
    const auto e3 = extrapolated.view({-1, 1, 1});
    const auto b3 = beta.view({-1, 1, 1});
    for (int64_t k = 1; k < N; ++k) {
      auto u = normalise_columns(cur.U[k] + b3 * (cur.U[k] - before[k])).first;
      start.U[k] = at::where(e3, u, cur.U[k]);
      start.G[k] = at::where(e3, gram(u), cur.G[k]);
    }
    if (!tracker.keep_going(it)) break;
  }
  std::vector<at::Tensor> U;
  for (const auto& u : cur.U) U.push_back(u.to(x.scalar_type()));
  return {cur.weights.to(x.scalar_type()), U, tracker.errors, tracker.n_iter, errors};
}

}  // namespace tdconv
