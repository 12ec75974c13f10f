// Tucker decompositions on ATen, batched over a leading dimension, on the input's device.
//
// Truncated HOSVD (De Lathauwer, De Moor, Vandewalle, SIAM J. Matrix Anal. Appl. 2000): the factor
// of each decomposed mode holds the leading eigenvectors of the Gram matrix of that mode's unfolding
// (its leading left singular vectors, at the cost of an I_n x I_n eigendecomposition instead of an
// SVD of an I_n x prod(others) matrix). HOOI (De Lathauwer et al., SIAM J. Matrix Anal. Appl. 2000,
// "On the best rank-(R1,...,RN) approximation"): starting from given factors, each mode's factor is
// re-fitted to X projected on all other factors. With orthonormal factors the error is
// sqrt(||X||^2 - ||core||^2) / ||X||, computed in float64 without rebuilding X.
#include <ATen/ATen.h>

#include <limits>

#include "../common/checks.h"
#include "../common/ops.h"

namespace tdconv {
namespace {

void check_modes(const at::Tensor& x, at::IntArrayRef modes, const char* who) {
  const int64_t N = x.dim() - 1;
  TDCONV_CHECK(!modes.empty(), "tdconv::", who, ": modes must not be empty");
  std::vector<bool> seen(N, false);
  for (auto m : modes) {
    TDCONV_CHECK(m >= 0 && m < N, "tdconv::", who, ": mode ", m, " out of range [0, ", N, ")");
    TDCONV_CHECK(!seen[m], "tdconv::", who, ": mode ", m, " repeated");
    seen[m] = true;
  }
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> tucker_hosvd(const at::Tensor& x, at::IntArrayRef ranks,
                                                            at::IntArrayRef modes) {
  TDCONV_CHECK_FLOAT(x, "x");
  TDCONV_CHECK(x.dim() >= 3 && x.numel() > 0, "tdconv::tucker_hosvd: x must be a non-empty [batch, I_0, ...], got ",
              x.sizes());
  check_modes(x, modes, "tucker_hosvd");
  TDCONV_CHECK(ranks.size() == modes.size(), "tdconv::tucker_hosvd: ", ranks.size(), " ranks for ", modes.size(),
              " modes");
  std::vector<at::Tensor> factors;
  for (size_t i = 0; i < modes.size(); ++i) {
    const int64_t I = x.size(modes[i] + 1);
    TDCONV_CHECK(ranks[i] >= 1 && ranks[i] <= I, "tdconv::tucker_hosvd: rank ", ranks[i], " of mode ", modes[i],
                " must be in [1, ", I, "]");
    factors.push_back(leading_eigvecs(unfolding_gram(x, modes[i]), ranks[i]));
  }
  at::Tensor core = x;
  for (size_t i = 0; i < modes.size(); ++i) core = mode_dot_t(core, factors[i], modes[i]);
  return {core.contiguous(), factors};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> tucker_hooi(
    const at::Tensor& x, at::TensorList init, at::IntArrayRef modes, int64_t n_iter_max, double tol,
    int64_t check_every) {
  TDCONV_CHECK_FLOAT(x, "x");
  TDCONV_CHECK(x.dim() >= 3 && x.numel() > 0, "tdconv::tucker_hooi: x must be a non-empty [batch, I_0, ...], got ",
              x.sizes());
  check_modes(x, modes, "tucker_hooi");
  const int64_t B = x.size(0), K = static_cast<int64_t>(modes.size());
  TDCONV_CHECK(static_cast<int64_t>(init.size()) == K, "tdconv::tucker_hooi: ", init.size(), " factors for ", K,
              " modes");
  std::vector<int64_t> ranks;
  std::vector<at::Tensor> U;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t I = x.size(modes[i] + 1);
    TDCONV_CHECK(init[i].dim() == 3 && init[i].size(0) == B && init[i].size(1) == I && init[i].size(2) >= 1 &&
                    init[i].size(2) <= I,
                "tdconv::tucker_hooi: init[", i, "] must have shape [", B, ", ", I, ", r] with 1 <= r <= ", I,
                ", got ", init[i].sizes());
    TDCONV_CHECK_TYPE(init[i].scalar_type() == x.scalar_type(), "tdconv::tucker_hooi: init[", i, "] has dtype ",
                     init[i].scalar_type(), " but x has ", x.scalar_type());
    TDCONV_CHECK_SAME_DEVICE(x, init[i], "x", "init factor");
    ranks.push_back(init[i].size(2));
    U.push_back(init[i].contiguous());
  }
  TDCONV_CHECK(n_iter_max >= 1, "tdconv::tucker_hooi: n_iter_max must be >= 1, got ", n_iter_max);
  TDCONV_CHECK(tol >= 0, "tdconv::tucker_hooi: tol must be >= 0, got ", tol);
  TDCONV_CHECK(check_every >= 1, "tdconv::tucker_hooi: check_every must be >= 1, got ", check_every);

  const auto norm_x2 = x.to(at::kDouble).reshape({B, -1}).square().sum(1);
  SweepTracker tracker(B, n_iter_max, tol, check_every, x.options());
  for (int64_t it = 0; it < n_iter_max; ++it) {
    const auto U_old = U;
    at::Tensor core2;
    for (int64_t i = 0; i < K; ++i) {
      at::Tensor y = x;
      for (int64_t j = 0; j < K; ++j)
        if (j != i) y = mode_dot_t(y, U[j], modes[j]);
      auto gram = unfolding_gram(y, modes[i]);
      U[i] = leading_eigvecs(gram, ranks[i]);
      // ||core||^2 = trace(U^T S U) for the last mode's Gram matrix S: no core needed per sweep.
      if (i == K - 1) core2 = (at::bmm(gram, U[i]) * U[i]).sum({1, 2}).to(at::kDouble);
    }
    auto err = ((norm_x2 - core2).clamp_min(0) / norm_x2).sqrt();
    const auto step = tracker.record(it, err);
    if (tracker.must_freeze(step)) {
      auto s3 = step.view({-1, 1, 1});
      for (int64_t i = 0; i < K; ++i) U[i] = at::where(s3, U[i], U_old[i]);
    }
    if (!tracker.keep_going(it)) break;
  }
  at::Tensor core = x;
  for (int64_t i = 0; i < K; ++i) core = mode_dot_t(core, U[i], modes[i]);
  return {core, U, tracker.errors, tracker.n_iter};
}

}  // namespace tdconv
