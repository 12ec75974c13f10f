// CP-ALS on ATen, batched over a leading dimension, on the input's device.
//
// Algorithm (Kolda & Bader, "Tensor Decompositions and Applications", SIAM Review 2009, sec. 3.4):
// each sweep solves, mode by mode, the normal equations U_n V_n = M_n, where
//   M_n = X_(n) (U_N ⊙ .. ⊙ U_{n+1} ⊙ U_{n-1} ⊙ .. ⊙ U_1)   (MTTKRP)
//   V_n = *_{m != n} U_m^T U_m                               (Hadamard product of Gram matrices)
// by Cholesky, then normalises the columns of U_n into the weights.
//
// The MTTKRPs come from the dimension tree of cp_common.h: a sweep costs two GEMMs of the size of the
// tensor times R (three when the largest mode is not the first).
//
// The relative error comes from norms and inner products (||X||^2 - 2<X, X^> + ||X^||^2), in
// float64; once it falls to where that formula's cancellation leaves too few digits (150 sqrt(eps)),
// the residual is formed explicitly instead. Convergence is decided per batch member on the device; a converged member is frozen
// (torch.where), so the only host synchronisation is `active.any()`, every `check_every` sweeps.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "../common/checks.h"
#include "../common/ops.h"
#include "cp_common.h"

namespace tdconv {
using namespace cp_detail;

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> cp_als(
    const at::Tensor& x, at::TensorList init, int64_t n_iter_max, double tol, double l2_reg,
    int64_t check_every) {
  const int64_t R = check_cp_arguments("cp_als", "init", x, init, n_iter_max, tol, check_every);
  TDCONV_CHECK(l2_reg >= 0, "tdconv::cp_als: l2_reg must be >= 0, got ", l2_reg);
  const int64_t N = x.dim() - 1, B = x.size(0);

  // Modes are updated in the natural order 0..N-1 (as in every reference implementation).
  DimTree tree(x, R, x.scalar_type());
  auto cur = start_iterate(init, at::ones({B, R}, x.options()), x.scalar_type());
  auto& U = cur.U;
  auto& G = cur.G;
  const auto& norm_x2 = tree.norm_x2();
  SweepTracker tracker(B, n_iter_max, tol, check_every, x.options());
  const auto inf = at::full({}, std::numeric_limits<double>::infinity(), x.options().dtype(at::kDouble));
  const double exact_below = 150.0 * std::sqrt(x.scalar_type() == at::kDouble
                                                   ? std::numeric_limits<double>::epsilon()
                                                   : std::numeric_limits<float>::epsilon());
  bool exact_error = false;

  for (int64_t it = 0; it < n_iter_max; ++it) {
    const auto previous = cur;
    at::Tensor M;
    for (int64_t k = 0; k < N; ++k) {
      M = tree.mttkrp(U, k);
      std::tie(U[k], cur.weights) = solve_normalised(hadamard_grams(G, k), M, l2_reg);
      G[k] = gram(U[k]);
    }

    at::Tensor err;
    if (exact_error) {
      // Near convergence the cancellation in the norm formula leaves only ~sqrt(eps) of accuracy;
      // from then on the residual is formed explicitly (one GEMM more per sweep).
      err = (tree.residual_norm(U, cur.weights).to(at::kDouble).square() / norm_x2).sqrt();
    } else {
      err = rel_error_from_norms(norm_x2, M, U, G, cur.weights);
    }

    // Members whose sweep was not accepted (converged earlier, or a non-finite error from a singular
    // system) keep their previous iterate.
    const auto step = tracker.record(it, err);
    cur.keep_unless(tracker, step, previous);
    // Is anybody still running, and is anybody close enough to convergence that the norm-based
    // error has become too coarse?
    bool near = false;
    const bool ask = !exact_error && tracker.is_check(it);
    if (!tracker.keep_going(it, ask ? (at::where(tracker.active(), err, inf) < exact_below).any() : at::Tensor(),
                            &near))
      break;
    exact_error = exact_error || near;
  }
  return {cur.weights, U, tracker.errors, tracker.n_iter};
}

std::vector<at::Tensor> cp_init_svd(const at::Tensor& x, int64_t rank, at::TensorList random_fill) {
  TDCONV_CHECK_FLOAT(x, "x");
  TDCONV_CHECK(x.dim() >= 3, "tdconv::cp_init_svd: x must be [batch, I_0, ..., I_{N-1}], got shape ", x.sizes());
  const int64_t N = x.dim() - 1;
  TDCONV_CHECK(rank >= 1, "tdconv::cp_init_svd: rank must be >= 1, got ", rank);
  TDCONV_CHECK(static_cast<int64_t>(random_fill.size()) == N, "tdconv::cp_init_svd: random_fill must hold ", N,
              " tensors");
  std::vector<at::Tensor> out;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t I = x.size(n + 1), r = std::min(rank, I);
    auto u = leading_eigvecs(unfolding_gram(x, n), r);
    if (rank > I) {
      // More components than the mode has singular vectors: the rest start from the caller's
      // seeded random columns (generated on the CPU, so identical on every device).
      const auto& fill = random_fill[n];
      TDCONV_CHECK(fill.dim() == 3 && fill.size(0) == x.size(0) && fill.size(1) == I && fill.size(2) == rank - I,
                  "tdconv::cp_init_svd: random_fill[", n, "] must have shape [", x.size(0), ", ", I, ", ",
                  rank - I, "], got ", fill.sizes());
      u = at::cat({u, fill.to(u.options())}, 2);
    }
    out.push_back(u.contiguous());
  }
  return out;
}

}  // namespace tdconv
