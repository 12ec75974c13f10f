// Small linear-algebra helpers shared by the decomposition drivers, and the dispatcher entry of the
// mode_contract kernel (so that the drivers reach the CPU or the CUDA kernel by the input's device).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../common/checks.h"
#include "../common/ops.h"

#include <limits>

namespace tdconv {

ContractShape check_mode_contract(const at::Tensor& y, const at::Tensor& u, int64_t dim) {
  TDCONV_CHECK_FLOAT(y, "y");
  TDCONV_CHECK_TYPE(u.scalar_type() == y.scalar_type(), "tdconv::mode_contract: u has dtype ", u.scalar_type(),
                   " but y has ", y.scalar_type());
  TDCONV_CHECK_SAME_DEVICE(y, u, "y", "u");
  TDCONV_CHECK(y.dim() >= 3, "tdconv::mode_contract: y must be [B, d_1, ..., d_k, R] with k >= 1, got shape ",
              y.sizes());
  TDCONV_CHECK(dim >= 1 && dim <= y.dim() - 2, "tdconv::mode_contract: dim must be in [1, ", y.dim() - 2,
              "], got ", dim);
  ContractShape s;
  s.B = y.size(0);
  s.R = y.size(-1);
  s.J = y.size(dim);
  s.P = 1;
  for (int64_t i = 1; i < dim; ++i) s.P *= y.size(i);
  s.Q = 1;
  for (int64_t i = dim + 1; i < y.dim() - 1; ++i) s.Q *= y.size(i);
  TDCONV_CHECK(u.dim() == 3 && u.size(0) == s.B && u.size(1) == s.J && u.size(2) == s.R,
              "tdconv::mode_contract: u must have shape [", s.B, ", ", s.J, ", ", s.R, "], got ", u.sizes());
  for (int64_t i = 0; i < y.dim(); ++i)
    if (i != dim) s.out_sizes.push_back(y.size(i));
  return s;
}

at::Tensor mode_contract(const at::Tensor& y, const at::Tensor& u, int64_t dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tdconv::mode_contract", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(y, u, dim);
}

at::Tensor fix_signs(const at::Tensor& u) {
  auto idx = u.abs().argmax(1, /*keepdim=*/true);  // [B, 1, r]
  auto s = u.gather(1, idx).sign();
  s = at::where(s == 0, at::ones_like(s), s);
  return u * s;
}

at::Tensor leading_eigvecs(const at::Tensor& gram, int64_t rank) {
  const int64_t n = gram.size(-1);
  TDCONV_CHECK(rank >= 1 && rank <= n, "tdconv: internal: rank ", rank, " out of [1, ", n, "]");
  auto eig = at::linalg_eigh(gram);  // ascending eigenvalues
  auto vecs = std::get<1>(eig).narrow(-1, n - rank, rank).flip(-1);
  return fix_signs(vecs).contiguous();
}

at::Tensor unfolding_gram(const at::Tensor& x, int64_t mode) {
  const int64_t B = x.size(0), n = x.size(mode + 1);
  auto xm = x.movedim(mode + 1, 1).reshape({B, n, -1});
  return at::bmm(xm, xm.transpose(1, 2));
}

at::Tensor mode_dot_t(const at::Tensor& x, const at::Tensor& u, int64_t mode) {
  const int64_t B = x.size(0), n = x.size(mode + 1), r = u.size(2);
  auto xm = x.movedim(mode + 1, -1);
  auto sizes = xm.sizes().vec();
  auto y = at::bmm(xm.reshape({B, -1, n}), u);
  sizes.back() = r;
  return y.view(sizes).movedim(-1, mode + 1).contiguous();
}

SweepTracker::SweepTracker(int64_t batch, int64_t n_iter_max, double tol, int64_t check_every,
                           const at::TensorOptions& opts)
    : errors(at::full({batch, n_iter_max}, std::numeric_limits<double>::quiet_NaN(), opts.dtype(at::kDouble))),
      n_iter(at::zeros({batch}, opts.dtype(at::kLong))),
      active_(at::ones({batch}, opts.dtype(at::kBool))),
      tol_(tol),
      check_every_(check_every) {}

at::Tensor SweepTracker::record(int64_t it, const at::Tensor& err, const at::Tensor& may_settle) {
  const auto finite = at::isfinite(err);
  const auto step = active_ & finite;
  const auto failed_now = active_ & finite.logical_not();
  auto col = errors.select(1, it);
  const auto inf = at::full({}, std::numeric_limits<double>::infinity(), col.options());
  col.copy_(at::where(step, err, at::where(failed_now, inf, col)));
  n_iter.add_(step.to(at::kLong));
  if (it > 0) {
    auto settled = (errors.select(1, it - 1) - err).abs() < tol_;
    if (may_settle.defined()) settled = settled & may_settle;
    active_ = step & settled.logical_not();
  } else {
    active_ = step;
  }
  return step;
}

bool SweepTracker::must_freeze(const at::Tensor& step) const {
  return check_every_ != 1 || !step.all().item<bool>();
}

bool SweepTracker::keep_going(int64_t it, const at::Tensor& extra, bool* extra_out) {
  if (!is_check(it)) return true;
  if (!extra.defined()) return active_.any().item<bool>();
  const auto flags = at::stack({active_.any(), extra}).cpu();
  *extra_out = flags[1].item<bool>();
  return flags[0].item<bool>();
}

}  // namespace tdconv
