// The host side of the fused small solve (small_solve.h), shared by its CUDA launch and its emulation.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "small_solve.h"

namespace tdconv {
namespace small_solve {

// Params over contiguous tensors: the Grams to multiply, m [B, I, R], the outputs u [B, I, R], lam [B, R].
template <typename T>
Params<T> make_params(const std::vector<at::Tensor>& grams, const at::Tensor& m, at::Tensor& u, at::Tensor& lam,
                      double l2_reg) {
  Params<T> P{};
  for (size_t g = 0; g < grams.size(); ++g) P.grams[g] = grams[g].const_data_ptr<T>();
  P.n_grams = static_cast<int>(grams.size());
  P.m = m.const_data_ptr<T>();
  P.u = u.mutable_data_ptr<T>();
  P.lam = lam.mutable_data_ptr<T>();
  P.I = m.size(1);
  P.R = m.size(2);
  P.l2_reg = l2_reg;
  return P;
}

}  // namespace small_solve
}  // namespace tdconv
