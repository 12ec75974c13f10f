// CP-ALS on ATen, batched over a leading dimension, on the input's device.
//
// Algorithm (Kolda & Bader, "Tensor Decompositions and Applications", SIAM Review 2009, sec. 3.4):
// each sweep solves, mode by mode, the normal equations U_n V_n = M_n, where
//   M_n = X_(n) (U_N ⊙ .. ⊙ U_{n+1} ⊙ U_{n-1} ⊙ .. ⊙ U_1)   (MTTKRP)
//   V_n = *_{m != n} U_m^T U_m                               (Hadamard product of Gram matrices)
// by Cholesky, then normalises the columns of U_n into the weights.
//
// MTTKRP by a dimension tree: the largest mode ("root") is moved to the front once. Its MTTKRP is one
// GEMM with the Khatri-Rao product of the *small* modes; the partial product X x_root U_root
// ([prod(other sizes), R]) is shared by all the other modes, whose MTTKRPs are cheap contractions
// of it (mode_contract kernel) instead of GEMMs against a Khatri-Rao product with the large root
// mode in it (for a 512x512x9 conv kernel that product would have 262144 x R entries). A sweep costs
// two GEMMs of the size of the tensor times R (three when the root is not the first mode).
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
  TDCONV_CHECK_FLOAT(x, "x");
  TDCONV_CHECK(x.dim() >= 3, "tdconv::cp_als: x must be [batch, I_0, ..., I_{N-1}] with N >= 2, got shape ",
              x.sizes());
  const int64_t N = x.dim() - 1, B = x.size(0);
  TDCONV_CHECK(B >= 1 && x.numel() > 0, "tdconv::cp_als: x must not be empty, got shape ", x.sizes());
  TDCONV_CHECK(static_cast<int64_t>(init.size()) == N, "tdconv::cp_als: init must hold ", N,
              " factors (one per mode), got ", init.size());
  const int64_t R = init[0].size(-1);
  TDCONV_CHECK(R >= 1, "tdconv::cp_als: rank must be >= 1");
  for (int64_t n = 0; n < N; ++n) {
    TDCONV_CHECK(init[n].dim() == 3 && init[n].size(0) == B && init[n].size(1) == x.size(n + 1) &&
                    init[n].size(2) == R,
                "tdconv::cp_als: init[", n, "] must have shape [", B, ", ", x.size(n + 1), ", ", R, "], got ",
                init[n].sizes());
    TDCONV_CHECK_TYPE(init[n].scalar_type() == x.scalar_type(), "tdconv::cp_als: init[", n, "] has dtype ",
                     init[n].scalar_type(), " but x has ", x.scalar_type());
    TDCONV_CHECK_SAME_DEVICE(x, init[n], "x", "init factor");
  }
  TDCONV_CHECK(n_iter_max >= 1, "tdconv::cp_als: n_iter_max must be >= 1, got ", n_iter_max);
  TDCONV_CHECK(tol >= 0, "tdconv::cp_als: tol must be >= 0, got ", tol);
  TDCONV_CHECK(l2_reg >= 0, "tdconv::cp_als: l2_reg must be >= 0, got ", l2_reg);
  TDCONV_CHECK(check_every >= 1, "tdconv::cp_als: check_every must be >= 1, got ", check_every);

  // Root of the dimension tree: the largest mode. Modes are updated in the natural order 0..N-1 (as
  // in every reference implementation); those before the root share Z = X x_root U_root (old root
  // factor), those after it share Y = X x_root U_root (new root factor).
  int64_t root = 0;
  for (int64_t n = 1; n < N; ++n)
    if (x.size(n + 1) > x.size(root + 1)) root = n;
  const auto xp = x.movedim(root + 1, 1).contiguous();  // [B, I_root, other modes in order]
  const int64_t Iroot = xp.size(1);
  const auto X0 = xp.view({B, Iroot, -1});
  const auto X0t = X0.transpose(1, 2);
  std::vector<int64_t> ysizes(xp.sizes().begin(), xp.sizes().end());
  ysizes.erase(ysizes.begin() + 1);
  ysizes.push_back(R);  // [B, other modes in order, R]
  // Position of mode k (k != root) in Y / Z, counting the batch dimension.
  auto pos = [root](int64_t k) { return k < root ? k + 1 : k; };

  std::vector<at::Tensor> U(N), G(N);
  for (int64_t k = 0; k < N; ++k) {
    U[k] = normalise_columns(init[k]).first;
    G[k] = gram(U[k]);
  }
  // The Khatri-Rao product of the modes other than the root, rows in xp's order.
  auto khatri_rao_of_others = [&](const std::vector<at::Tensor>& U) {
    std::vector<at::Tensor> others;
    for (int64_t m = 0; m < N; ++m)
      if (m != root) others.push_back(U[m]);
    return khatri_rao(others);
  };
  const auto norm_x2 = X0.to(at::kDouble).square().sum({1, 2});  // [B]
  auto weights = at::ones({B, R}, x.options());
  SweepTracker tracker(B, n_iter_max, tol, check_every, x.options());
  const auto inf = at::full({}, std::numeric_limits<double>::infinity(), x.options().dtype(at::kDouble));
  const double exact_below = 150.0 * std::sqrt(x.scalar_type() == at::kDouble
                                                   ? std::numeric_limits<double>::epsilon()
                                                   : std::numeric_limits<float>::epsilon());
  bool exact_error = false;

  for (int64_t it = 0; it < n_iter_max; ++it) {
    const auto U_old = U, G_old = G;
    const auto w_old = weights;
    at::Tensor shared, M;
    for (int64_t k = 0; k < N; ++k) {
      if (k == root) {
        // The root's MTTKRP: one GEMM against the Khatri-Rao product of the other (small) modes.
        M = at::bmm(X0, khatri_rao_of_others(U));
      } else {
        if (k == 0 || k == root + 1) shared = at::bmm(X0t, U[root]).view(ysizes);  // Z, then Y
        M = shared;
        for (int64_t m = N - 1; m >= 0; --m)
          if (m != k && m != root) M = mode_contract(M, U[m], pos(m));
      }
      std::tie(U[k], weights) = solve_normalised(hadamard_grams(G, k), M, l2_reg);
      G[k] = gram(U[k]);
    }

    at::Tensor err;
    if (exact_error) {
      // Near convergence the cancellation in the norm formula leaves only ~sqrt(eps) of accuracy;
      // from then on the residual is formed explicitly (one GEMM more per sweep).
      auto xhat = at::bmm(U[root] * weights.unsqueeze(1), khatri_rao_of_others(U).transpose(1, 2));
      err = (at::linalg_vector_norm(X0 - xhat, 2, {1, 2}, false, c10::nullopt).to(at::kDouble).square() / norm_x2)
                .sqrt();
    } else {
      // ||X - X^||^2 = ||X||^2 - 2 <X, X^> + ||X^||^2, with <X, X^> from the last mode's MTTKRP.
      auto lam = weights.to(at::kDouble);
      auto inner = ((M.to(at::kDouble) * U[N - 1].to(at::kDouble)).sum(1) * lam).sum(-1);
      auto vall = hadamard_grams(G, -1).to(at::kDouble);
      auto norm_hat2 = (at::bmm(lam.unsqueeze(1), vall).squeeze(1) * lam).sum(-1);
      err = ((norm_x2 - 2 * inner + norm_hat2).clamp_min(0) / norm_x2).sqrt();
    }

    // Members whose sweep was not accepted (converged earlier, or a non-finite error from a singular
    // system) keep their previous iterate.
    const auto step = tracker.record(it, err);
    if (tracker.must_freeze(step)) {
      auto s3 = step.view({-1, 1, 1});
      for (int64_t k = 0; k < N; ++k) {
        U[k] = at::where(s3, U[k], U_old[k]);
        G[k] = at::where(s3, G[k], G_old[k]);
      }
      weights = at::where(step.view({-1, 1}), weights, w_old);
    }
    // Is anybody still running, and is anybody close enough to convergence that the norm-based
    // error has become too coarse?
    bool near = false;
    const bool ask = !exact_error && tracker.is_check(it);
    if (!tracker.keep_going(it, ask ? (at::where(tracker.active(), err, inf) < exact_below).any() : at::Tensor(),
                            &near))
      break;
    exact_error = exact_error || near;
  }
  return {weights, U, tracker.errors, tracker.n_iter};
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
