// What the CP drivers (cp_als.cpp, cp_epc.cpp) share: their argument checks, the MTTKRPs by a
// dimension tree, the error from norms, and the iterate that members which stopped keep. Internal
// to csrc/decomp; the non-inline parts are in cp_common.cpp.
#pragma once
#include <ATen/ATen.h>

#include "../common/ops.h"

#include <limits>
#include <utility>
#include <vector>

namespace tdconv {
class SweepTracker;

namespace cp_detail {

// Khatri-Rao product of factors [B, I_k, R], rows in C order of (I_a, I_b, ..): [B, prod I_k, R].
inline at::Tensor khatri_rao(const std::vector<at::Tensor>& fs) {
  at::Tensor k = fs[0];
  for (size_t i = 1; i < fs.size(); ++i) {
    k = (k.unsqueeze(2) * fs[i].unsqueeze(1)).reshape({k.size(0), -1, k.size(2)});
  }
  return k;
}

// Hadamard product of all Gram matrices but grams[skip]; always a new tensor.
inline at::Tensor hadamard_grams(const std::vector<at::Tensor>& grams, int64_t skip) {
  at::Tensor v;
  for (int64_t i = 0; i < static_cast<int64_t>(grams.size()); ++i) {
    if (i == skip) continue;
    v = v.defined() ? v * grams[i] : grams[i];
  }
  return v.is_same(grams[skip == 0 ? 1 : 0]) ? v.clone() : v;
}

// U [B, I, R] with unit columns, and the column norms [B, R]; a zero column stays zero (0 / tiny).
inline std::pair<at::Tensor, at::Tensor> normalise_columns(const at::Tensor& u) {
  auto lam = at::linalg_vector_norm(u, 2, {1}, false, c10::nullopt);
  auto scale = lam.clamp_min(std::numeric_limits<float>::min()).unsqueeze(1);
  return {(u / scale).contiguous(), lam};
}

// Solve U V = M (V [B, R, R] symmetric positive semi-definite, M [B, I, R]) by Cholesky on
// V + (l2_reg + 10 eps max diag V) I: the ridge, plus a jitter of a few ulps so that a V that is
// semi-definite only up to rounding still factors. Returns U with unit columns and their norms. A member
// whose V still does not factor gets a NaN U (LAPACK leaves a finite partial factor, whose solve would be
// a finite wrong answer): its sweep error is then non-finite, and the driver keeps its last good iterate.
// On CUDA (`triangular`) the factor is applied by two triangular solves, U L L^T = M, the arithmetic of
// LAPACK's potrs: with the Cholesky, they run on cuSOLVER/cuBLAS with device-side pointer arrays and
// info, so a CUDA graph can capture them (the torch versions that send a batched cholesky_solve on CUDA
// to MAGMA stage its pointer arrays on the host, which cannot be captured). On the CPU cholesky_solve
// is faster (ATen's right-sided triangular solve copies the factor: 8x slower for I = 9, R = 256).
inline std::pair<at::Tensor, at::Tensor> solve_normalised(at::Tensor v, const at::Tensor& m, double l2_reg,
                                                          bool triangular) {
  const double eps = v.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                     : std::numeric_limits<float>::epsilon();
  auto diag = v.diagonal(0, -2, -1);                         // v is a fresh tensor: shift it in place
  diag.add_((diag.amax(-1, true) * (10.0 * eps)).add_(l2_reg));
  auto chol = at::linalg_cholesky_ex(v);
  const auto& L = std::get<0>(chol);
  at::Tensor u;
  if (triangular) {
    auto z = at::linalg_solve_triangular(L.transpose(1, 2), m, /*upper=*/true, /*left=*/false);  // Z L^T = M
    u = at::linalg_solve_triangular(L, z, /*upper=*/false, /*left=*/false);                       // U L = Z
  } else {
    u = at::cholesky_solve(m.transpose(1, 2), L).transpose(1, 2);
  }
  const auto failed = (std::get<1>(chol) != 0).view({-1, 1, 1});  // on the device: no host synchronisation
  u = at::where(failed, at::full({}, std::numeric_limits<double>::quiet_NaN(), u.options()), u);
  return normalise_columns(u);
}

// Whether the fused small solve can take this mode update: CUDA, R <= 64, at most 8 Grams, a grid that fits.
inline bool small_solve_applies(bool cuda, int64_t batch, int64_t rank, size_t n_factors) {
  return cuda && cuda_small_solve() != nullptr && rank <= 64 && n_factors <= 9 &&
         batch <= std::numeric_limits<int32_t>::max();
}

// The mode update U_k V = M with V = the Hadamard product of the Grams but G[k]: the fused kernel where
// it applies and is asked for (`fused`: inside a CUDA graph; or TDCONV_CUDA_SMALL_SOLVE=1), the ATen ops
// otherwise. The ATen ops on CUDA solve by triangular solves (capturable) only on the engine paths that
// are switched on (graphs, the fused solve), which have not run on a GPU yet; by default they run
// cholesky_solve, as validated.
inline std::pair<at::Tensor, at::Tensor> solve_mode(const std::vector<at::Tensor>& G, int64_t k, const at::Tensor& m,
                                                    double l2_reg, bool fused = false) {
  const bool fused_solve = fused || small_solve_enabled();
  if (fused_solve && small_solve_applies(m.is_cuda(), m.size(0), m.size(2), G.size()))
    return cuda_small_solve()(G, k, m, l2_reg);
  const bool engine_paths = fused_solve || sweep_graphs_enabled();
  return solve_normalised(hadamard_grams(G, k), m, l2_reg, /*triangular=*/m.is_cuda() && engine_paths);
}

inline at::Tensor gram(const at::Tensor& u) { return at::bmm(u.transpose(1, 2), u); }

// The checks common to the CP drivers of x [B, I_0, .., I_{N-1}] (float32/float64, N >= 2, not empty)
// and its factors [B, I_n, R] (named `name` in the messages, e.g. "init"), and of the sweep
// arguments. `op` is the op's name ("cp_als"). Returns R.
int64_t check_cp_arguments(const char* op, const char* name, const at::Tensor& x, at::TensorList factors,
                           int64_t n_iter_max, double tol, int64_t check_every);

// The MTTKRPs M_k = X_(k) (Khatri-Rao of the factors but U_k) of a batch x [B, I_0, ..] by a
// dimension tree. The largest mode ("root") is moved to the front once. Its MTTKRP is one GEMM with
// the Khatri-Rao product of the *small* modes; the partial product X x_root U_root ([prod(other
// sizes), R]) is shared by all the other modes, whose MTTKRPs are cheap contractions of it
// (mode_contract kernel) instead of GEMMs against a Khatri-Rao product with the large root mode in
// it (for a 512x512x9 conv kernel that product would have 262144 x R entries).
class DimTree {
 public:
  // Works in x's dtype.
  DimTree(const at::Tensor& x, int64_t rank);

  // M_k [B, I_k, R] in x's dtype (factors of another dtype are converted). Within a sweep the modes
  // are visited in the order 0..N-1, each factor updated before the next mode's MTTKRP: those before
  // the root share Z = X x_root U_root (old root factor), those after it share Y = X x_root U_root
  // (new root factor), each computed once per sweep, so that a sweep costs two GEMMs of the size of
  // the tensor times R (three when the root is not mode 0).
  at::Tensor mttkrp(const std::vector<at::Tensor>& U, int64_t k);
  // Khatri-Rao product of the factors but the root's, rows in the order of the columns of X with
  // the root mode first.
  at::Tensor khatri_rao_of_others(const std::vector<at::Tensor>& U) const;
  // ||X - [[weights; U]]||, formed explicitly (one GEMM more), [B] in x's dtype (factors in it too).
  at::Tensor residual_norm(const std::vector<at::Tensor>& U, const at::Tensor& weights) const;

  int64_t root() const { return root_; }
  // ||X||^2 per member, [B] float64.
  const at::Tensor& norm_x2() const { return norm_x2_; }

 private:
  at::Tensor in_dtype(const at::Tensor& u) const { return u.to(X0_.scalar_type()); }

  int64_t N_, root_;
  at::Tensor X0_, X0t_, norm_x2_, shared_;
  std::vector<int64_t> ysizes_;  // [B, other modes in order, R]
};

// The relative error sqrt(||X||^2 - 2 <X, X^> + ||X^||^2) / ||X|| [B] (float64) of the model
// [[weights; U]] with unit-column factors U and their Gram matrices G, without forming X^: <X, X^>
// comes from the last mode's MTTKRP M [B, I_{N-1}, R]. Cancellation leaves it ~sqrt(eps) accurate.
at::Tensor rel_error_from_norms(const at::Tensor& norm_x2, const at::Tensor& M, const std::vector<at::Tensor>& U,
                                const std::vector<at::Tensor>& G, const at::Tensor& weights);

// A CP iterate of the batch: unit-column factors, their Gram matrices, the weights.
struct CpIterate {
  std::vector<at::Tensor> U, G;
  at::Tensor weights;
  // Members not in `step` ([B] bool) take `previous`'s values; skipped where the tracker says every
  // member stepped (see SweepTracker::must_freeze).
  void keep_unless(const SweepTracker& tracker, const at::Tensor& step, const CpIterate& previous);
};

// Factors [B, I_n, R] with unit columns (in dtype) and their Gram matrices.
CpIterate start_iterate(at::TensorList factors, const at::Tensor& weights, at::ScalarType dtype);

}  // namespace cp_detail
}  // namespace tdconv
