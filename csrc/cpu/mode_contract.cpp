// CPU kernel of tdconv::mode_contract: out[b, p, q, r] = sum_j y[b, p, j, q, r] * u[b, j, r].
// Rows (b, p, q) are split across threads; the innermost loop runs over the contiguous rank index
// and is vectorised by the compiler.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/ops.h"

namespace tdconv {
namespace {

template <typename T>
void contract_rows(const T* y, const T* u, T* out, const ContractShape& s, int64_t begin, int64_t end) {
  const int64_t R = s.R, J = s.J, Q = s.Q, P = s.P;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t q = row % Q, p = (row / Q) % P, b = row / (Q * P);
    const T* yb = y + ((b * P + p) * J * Q + q) * R;  // y[b, p, 0, q, :]
    const T* ub = u + b * J * R;
    T* o = out + row * R;
    for (int64_t r = 0; r < R; ++r) o[r] = T(0);
    for (int64_t j = 0; j < J; ++j) {
      const T* yj = yb + j * Q * R;
      const T* uj = ub + j * R;
      for (int64_t r = 0; r < R; ++r) o[r] += yj[r] * uj[r];
    }
  }
}

at::Tensor mode_contract_cpu(const at::Tensor& y_in, const at::Tensor& u_in, int64_t dim) {
  auto s = check_mode_contract(y_in, u_in, dim);
  auto y = y_in.contiguous();
  auto u = u_in.contiguous();
  auto out = at::empty(s.out_sizes, y.options());
  const int64_t rows = s.B * s.P * s.Q;
  if (rows == 0 || s.R == 0) return out;
  if (s.J == 0) return out.zero_();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.J * s.R));
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mode_contract_cpu", [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { contract_rows(yp, up, op, s, b, e); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tdconv, CPU, m) { m.impl("mode_contract", &mode_contract_cpu); }

}  // namespace tdconv
