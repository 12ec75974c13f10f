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
// float64; once a member's error falls to where that formula's cancellation leaves too few digits
// (150 sqrt(eps)), its residual is formed explicitly from the next sweep on. That switch, like
// convergence, is decided per batch member and per sweep on the device (a flag, torch.where), so the
// sweep at which a member stops, its error history and its factors do not depend on how often the
// host looks: the only host synchronisation is reading `active.any()`, every `check_every` sweeps.
// A converged member is frozen (torch.where) until then.
#include <ATen/ATen.h>

#include <cmath>
#include <functional>
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
  DimTree tree(x, R);
  auto cur = start_iterate(init, at::ones({B, R}, x.options()), x.scalar_type());
  auto& U = cur.U;
  auto& G = cur.G;
  const auto& norm_x2 = tree.norm_x2();
  SweepTracker tracker(B, n_iter_max, tol, check_every, x.options());
  const double exact_below = 150.0 * std::sqrt(x.scalar_type() == at::kDouble
                                                   ? std::numeric_limits<double>::epsilon()
                                                   : std::numeric_limits<float>::epsilon());
  // Members whose error is formed explicitly: once set, a member's flag stays set.
  auto exact = at::zeros({B}, x.options().dtype(at::kBool));
  // Whether this sweep forms the explicit residual (one GEMM more) for the batch. The host knows that
  // no running member needs it only at the sweeps where it reads the flags (every sweep on the CPU).
  bool form_residual = false;

  // On CUDA with TDCONV_CUDA_GRAPHS=1, the mode updates of a sweep (MTTKRPs, solves, Grams) are captured
  // once in a CUDA graph that reads the iterate from fixed buffers (u_in, g_in, w_in) and writes the
  // next into its own (u_out, ...); the error, the tracker and the freezing of members stay eager, and
  // the accepted iterate is copied back into the fixed buffers. Inside the graph the R x R step runs
  // the fused small solve where it applies (R <= 64) and the ATen Cholesky and triangular solves
  // otherwise (cuSOLVER/cuBLAS with device-side pointers and info: capturable). A capture that fails
  // anyway (counted) leaves the call on eager sweeps.
  // One sweep's mode updates, in place on (u, g); m: the last MTTKRP, w: the last weights.
  const auto update_modes = [&](std::vector<at::Tensor>& u, std::vector<at::Tensor>& g, at::Tensor& m, at::Tensor& w,
                                bool fused) {
    for (int64_t k = 0; k < N; ++k) {
      m = tree.mttkrp(u, k);
      std::tie(u[k], w) = solve_mode(g, k, m, l2_reg, fused);
      g[k] = gram(u[k]);
    }
  };
  std::vector<at::Tensor> u_in, g_in, u_out, g_out;
  at::Tensor w_in, w_out, m_out;
  std::function<void()> replay;
  if (x.is_cuda() && cuda_graph_capture() != nullptr && sweep_graphs_enabled()) {
    for (int64_t n = 0; n < N; ++n) {
      u_in.push_back(U[n].clone());
      g_in.push_back(G[n].clone());
    }
    w_in = cur.weights.clone();
    const auto sweep = [&] {
      u_out = u_in;  // handles: the updates write new tensors, the fixed buffers stay as they are
      g_out = g_in;
      update_modes(u_out, g_out, m_out, w_out, /*fused=*/true);
    };
    replay = cuda_graph_capture()(sweep, x.device().index());
    if (replay) {
      U = u_in;
      G = g_in;
      cur.weights = w_in;
    }
  }

  for (int64_t it = 0; it < n_iter_max; ++it) {
    const auto previous = cur;
    at::Tensor M;
    if (replay) {
      replay();
      count_engine_stat(kGraphReplays);
      U = u_out;
      G = g_out;
      cur.weights = w_out;
      M = m_out;
    } else {
      update_modes(U, G, M, cur.weights, /*fused=*/false);
    }

    auto err = rel_error_from_norms(norm_x2, M, U, G, cur.weights);
    if (form_residual) {
      // Near convergence the cancellation in the norm formula leaves only ~sqrt(eps) of accuracy.
      auto explicit_err = (tree.residual_norm(U, cur.weights).to(at::kDouble).square() / norm_x2).sqrt();
      err = at::where(exact, explicit_err, err);
    }

    // Members whose sweep was not accepted (converged earlier, or a non-finite error from a singular
    // system) keep their previous iterate.
    const auto step = tracker.record(it, err);
    cur.keep_unless(tracker, step, previous);
    if (replay) {  // the next replay reads the accepted iterate from the fixed buffers
      for (int64_t n = 0; n < N; ++n) {
        u_in[n].copy_(U[n]);
        g_in[n].copy_(G[n]);
      }
      w_in.copy_(cur.weights);
      U = u_in;
      G = g_in;
      cur.weights = w_in;
    }
    exact = exact.logical_or(err < exact_below);  // for the next sweep; a NaN error compares false
    // Is anybody still running, and does any of them need the explicit residual next sweep?
    const bool check = tracker.is_check(it);
    bool any_exact = true;
    if (!tracker.keep_going(it, check ? exact.logical_and(tracker.active()).any() : at::Tensor(), &any_exact))
      break;
    form_residual = !check || any_exact;
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
