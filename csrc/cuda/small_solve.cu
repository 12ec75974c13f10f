// CUDA kernel of the fused small solve of a CP-ALS mode update (csrc/decomp/small_solve.h): one block
// per batch member. Used by the drivers on CUDA for ranks up to 64 when TDCONV_CUDA_SMALL_SOLVE=1 or
// TDCONV_CUDA_GRAPHS=1 (both off by default until they have run on a GPU).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../common/checks.h"
#include "../common/ops.h"
#include "../decomp/small_solve_host.h"

namespace tdconv {
namespace {

struct DeviceCtx {
  __device__ void sync() { __syncthreads(); }
};

template <typename T>
__global__ void __launch_bounds__(small_solve::kThreads) small_solve_kernel(const small_solve::Params<T> P) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceCtx ctx;
  small_solve::block<T>(P, static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x), smem, ctx);
}

std::pair<at::Tensor, at::Tensor> small_solve_cuda(const std::vector<at::Tensor>& grams_all, int64_t skip,
                                                   const at::Tensor& m_in, double l2_reg) {
  std::vector<at::Tensor> grams;
  for (int64_t i = 0; i < static_cast<int64_t>(grams_all.size()); ++i)
    if (i != skip) grams.push_back(grams_all[i].contiguous());
  check_small_solve("cp_als", grams, m_in, l2_reg, small_solve::kMaxRank, small_solve::kMaxGrams);
  const c10::cuda::CUDAGuard guard(m_in.device());
  const auto m = m_in.contiguous();
  auto u = at::empty_like(m);
  auto lam = at::empty({m.size(0), m.size(2)}, m.options());
  const int64_t B = m.size(0);
  // Checked before the launch (solve_mode sends only batches that fit gridDim.x): the shared memory
  // (at most 32 KiB + 8 bytes) fits the 48 KiB every device grants without opting in.
  TDCONV_CHECK(B <= std::numeric_limits<int32_t>::max(), "tdconv::cp_als: batch of ", B, " too large for one launch");
  if (B == 0) return {u, lam};
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "small_solve_cuda", [&] {
    const auto P = small_solve::make_params<scalar_t>(grams, m, u, lam, l2_reg);
    const auto bytes = small_solve::smem_bytes(P.R, sizeof(scalar_t));
    TDCONV_CHECK(bytes <= 48 * 1024, "tdconv::cp_als: the small solve needs ", bytes, " bytes of shared memory");
    small_solve_kernel<scalar_t><<<static_cast<unsigned>(B), small_solve::kThreads, static_cast<size_t>(bytes),
                                   c10::cuda::getCurrentCUDAStream()>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    count_engine_stat(kSmallSolves);
  });
  return {u, lam};
}

const bool registered = (cuda_small_solve() = &small_solve_cuda, true);

}  // namespace
}  // namespace tdconv
