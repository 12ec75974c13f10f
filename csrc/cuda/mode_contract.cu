// CUDA kernel of tdconv::mode_contract: out[b, p, q, r] = sum_j y[b, p, j, q, r] * u[b, j, r].
// One thread per output element, the rank index fastest, so that the loads of y and u of a warp are
// contiguous; the sum over j is kept in a register in the accumulation type.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/ops.h"

namespace tdconv {
namespace {

template <typename T>
__global__ void mode_contract_kernel(const T* __restrict__ y, const T* __restrict__ u, T* __restrict__ out,
                                     int64_t P, int64_t J, int64_t Q, int64_t R, int64_t total) {
  using acc_t = at::opmath_type<T>;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx % R;
    const int64_t row = idx / R;
    const int64_t q = row % Q, p = (row / Q) % P, b = row / (Q * P);
    const T* yb = y + ((b * P + p) * J * Q + q) * R + r;
    const T* ub = u + b * J * R + r;
    acc_t acc = 0;
    for (int64_t j = 0; j < J; ++j) acc += static_cast<acc_t>(yb[j * Q * R]) * static_cast<acc_t>(ub[j * R]);
    out[idx] = static_cast<T>(acc);
  }
}

at::Tensor mode_contract_cuda(const at::Tensor& y_in, const at::Tensor& u_in, int64_t dim) {
  auto s = check_mode_contract(y_in, u_in, dim);
  const c10::cuda::CUDAGuard guard(y_in.device());
  auto y = y_in.contiguous();
  auto u = u_in.contiguous();
  auto out = at::empty(s.out_sizes, y.options());
  const int64_t total = s.B * s.P * s.Q * s.R;
  if (total == 0) return out;
  if (s.J == 0) return out.zero_();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mode_contract_cuda", [&] {
    mode_contract_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), s.P, s.J,
        s.Q, s.R, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tdconv, CUDA, m) { m.impl("mode_contract", &mode_contract_cuda); }

}  // namespace tdconv
