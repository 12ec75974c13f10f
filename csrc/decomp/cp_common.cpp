// The parts of the CP drivers' shared code that are not inline (see cp_common.h).
#include "cp_common.h"

#include "../common/checks.h"
#include "../common/ops.h"

namespace tdconv {
namespace cp_detail {

int64_t check_cp_arguments(const char* op, const char* name, const at::Tensor& x, at::TensorList factors,
                           int64_t n_iter_max, double tol, int64_t check_every) {
  TDCONV_CHECK_FLOAT(x, "x");
  TDCONV_CHECK(x.dim() >= 3, "tdconv::", op, ": x must be [batch, I_0, ..., I_{N-1}] with N >= 2, got shape ",
               x.sizes());
  const int64_t N = x.dim() - 1, B = x.size(0);
  TDCONV_CHECK(B >= 1 && x.numel() > 0, "tdconv::", op, ": x must not be empty, got shape ", x.sizes());
  TDCONV_CHECK(static_cast<int64_t>(factors.size()) == N, "tdconv::", op, ": ", name, " must hold ", N,
               " factors (one per mode), got ", factors.size());
  const int64_t R = factors[0].size(-1);
  TDCONV_CHECK(R >= 1, "tdconv::", op, ": rank must be >= 1");
  for (int64_t n = 0; n < N; ++n) {
    const auto& f = factors[n];
    TDCONV_CHECK(f.dim() == 3 && f.size(0) == B && f.size(1) == x.size(n + 1) && f.size(2) == R, "tdconv::", op,
                 ": ", name, "[", n, "] must have shape [", B, ", ", x.size(n + 1), ", ", R, "], got ", f.sizes());
    TDCONV_CHECK_TYPE(f.scalar_type() == x.scalar_type(), "tdconv::", op, ": ", name, "[", n, "] has dtype ",
                      f.scalar_type(), " but x has ", x.scalar_type());
    TDCONV_CHECK_SAME_DEVICE(x, f, "x", detail::message(name, "[", n, "]"));
  }
  TDCONV_CHECK(n_iter_max >= 1, "tdconv::", op, ": n_iter_max must be >= 1, got ", n_iter_max);
  TDCONV_CHECK(tol >= 0, "tdconv::", op, ": tol must be >= 0, got ", tol);
  TDCONV_CHECK(check_every >= 1, "tdconv::", op, ": check_every must be >= 1, got ", check_every);
  return R;
}

DimTree::DimTree(const at::Tensor& x, int64_t rank) : N_(x.dim() - 1), root_(0) {
  for (int64_t n = 1; n < N_; ++n)
    if (x.size(n + 1) > x.size(root_ + 1)) root_ = n;
  const int64_t B = x.size(0);
  const auto xp = x.movedim(root_ + 1, 1).contiguous();  // [B, I_root, other modes in order]
  X0_ = xp.view({B, xp.size(1), -1});
  X0t_ = X0_.transpose(1, 2);
  ysizes_.assign(xp.sizes().begin(), xp.sizes().end());
  ysizes_.erase(ysizes_.begin() + 1);
  ysizes_.push_back(rank);
  norm_x2_ = X0_.to(at::kDouble).square().sum({1, 2});
}

at::Tensor DimTree::khatri_rao_of_others(const std::vector<at::Tensor>& U) const {
  std::vector<at::Tensor> others;
  for (int64_t m = 0; m < N_; ++m)
    if (m != root_) others.push_back(in_dtype(U[m]));
  return khatri_rao(others);
}

at::Tensor DimTree::mttkrp(const std::vector<at::Tensor>& U, int64_t k) {
  if (k == root_) return at::bmm(X0_, khatri_rao_of_others(U));
  if (k == 0 || k == root_ + 1) shared_ = at::bmm(X0t_, in_dtype(U[root_])).view(ysizes_);  // Z, then Y
  // Position of mode m (m != root) in Y / Z, counting the batch dimension.
  auto pos = [this](int64_t m) { return m < root_ ? m + 1 : m; };
  at::Tensor M = shared_;
  for (int64_t m = N_ - 1; m >= 0; --m)
    if (m != k && m != root_) M = mode_contract(M, in_dtype(U[m]), pos(m));
  return M;
}

at::Tensor DimTree::residual_norm(const std::vector<at::Tensor>& U, const at::Tensor& weights) const {
  auto xhat = at::bmm(U[root_] * weights.unsqueeze(1), khatri_rao_of_others(U).transpose(1, 2));
  return at::linalg_vector_norm(X0_ - xhat, 2, {1, 2}, false, c10::nullopt);
}

at::Tensor rel_error_from_norms(const at::Tensor& norm_x2, const at::Tensor& M, const std::vector<at::Tensor>& U,
                                const std::vector<at::Tensor>& G, const at::Tensor& weights) {
  // ||X - X^||^2 = ||X||^2 - 2 <X, X^> + ||X^||^2.
  auto lam = weights.to(at::kDouble);
  auto inner = ((M.to(at::kDouble) * U.back().to(at::kDouble)).sum(1) * lam).sum(-1);
  auto vall = hadamard_grams(G, -1).to(at::kDouble);
  auto norm_hat2 = (at::bmm(lam.unsqueeze(1), vall).squeeze(1) * lam).sum(-1);
  return ((norm_x2 - 2 * inner + norm_hat2).clamp_min(0) / norm_x2).sqrt();
}

void CpIterate::keep_unless(const SweepTracker& tracker, const at::Tensor& step, const CpIterate& previous) {
  if (!tracker.must_freeze(step)) return;
  auto s3 = step.view({-1, 1, 1});
  for (size_t k = 0; k < U.size(); ++k) {
    U[k] = at::where(s3, U[k], previous.U[k]);
    G[k] = at::where(s3, G[k], previous.G[k]);
  }
  weights = at::where(step.view({-1, 1}), weights, previous.weights);
}

CpIterate start_iterate(at::TensorList factors, const at::Tensor& weights, at::ScalarType dtype) {
  CpIterate s;
  for (const auto& f : factors) {
    s.U.push_back(normalise_columns(f.to(dtype)).first);
    s.G.push_back(gram(s.U.back()));
  }
  s.weights = weights.to(dtype, /*non_blocking=*/false, /*copy=*/true);  // never an alias of an input
  return s;
}

}  // namespace cp_detail
}  // namespace tdconv
