// Small helpers shared by the CP drivers (cp_als.cpp, cp_epc.cpp). Internal to csrc/decomp.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <utility>
#include <vector>

namespace tdconv {
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
// semi-definite only up to rounding still factors. Returns U with unit columns and their norms.
inline std::pair<at::Tensor, at::Tensor> solve_normalised(at::Tensor v, const at::Tensor& m, double l2_reg) {
  const double eps = v.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                     : std::numeric_limits<float>::epsilon();
  auto diag = v.diagonal(0, -2, -1);                         // v is a fresh tensor: shift it in place
  diag.add_((diag.amax(-1, true) * (10.0 * eps)).add_(l2_reg));
  auto chol = at::linalg_cholesky_ex(v);
  auto u = at::cholesky_solve(m.transpose(1, 2), std::get<0>(chol)).transpose(1, 2);
  return normalise_columns(u);
}

inline at::Tensor gram(const at::Tensor& u) { return at::bmm(u.transpose(1, 2), u); }

}  // namespace cp_detail
}  // namespace tdconv
