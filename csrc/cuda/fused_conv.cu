// CUDA kernels of tdconv::cp_conv2d and tdconv::tucker_conv2d: y1 = x * first^T on cuBLAS, then one
// kernel for the spatial stage and the 1x1 conv back with the bias (and the ReLU). The block program
// is csrc/common/fused_tiles.h, shared with the host emulation that the tests run without a GPU;
// this file only launches it. float16 / bfloat16 run on tensor cores (WMMA, float32 accumulation),
// float32 / float64 on a SIMT loop. A call whose block would need more shared memory than the device
// grants runs the ATen chain (cuDNN) instead. See docs/kernels.md for what has run on a GPU.
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../common/checks.h"
#include "../common/fused_conv.h"

namespace tdconv {
namespace {

// What the device grants: shared memory per block (opt-in) and the compute capability's major.
struct DeviceLimits {
  int64_t smem_optin;
  int major;
};
DeviceLimits device_limits(int device) {
  int smem = 0, major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return {smem, major};
}

struct DeviceCtx {
  __device__ void sync() { __syncthreads(); }
};

template <typename T, bool kTucker, bool kWmma>
__global__ void __launch_bounds__(fused::kThreads) fused_conv_kernel(const fused::Params<T> P) {
  extern __shared__ __align__(fused::kAlign) unsigned char smem[];
  DeviceCtx ctx;
  fused::fused_block<T, kTucker, kWmma>(P, static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x), smem,
                                        ctx);
}

template <typename T, bool kTucker>
void launch(const fused::Params<T>& P, cudaStream_t stream) {
  constexpr bool wmma = std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value;
  auto kernel = fused_conv_kernel<T, kTucker, wmma>;
  const auto bytes = static_cast<int>(P.plan.smem_bytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned>(P.plan.blocks), fused::kThreads, bytes, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fused_conv2d_cuda(bool tucker, const at::Tensor& x, const at::Tensor& first, const at::Tensor& spatial,
                             const at::Tensor& last, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const char* op = tucker ? "tucker_conv2d" : "cp_conv2d";
  const ConvShape s = check_factorized_conv2d(op, tucker, x, first, spatial, last, bias, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // gradients are the autograd formula's job
  const fused::Plan plan = fused_plan(s, x.scalar_type(), tucker);
  const DeviceLimits lim = device_limits(x.device().index());
  // The launch is checked before it is made: the grid fits gridDim.x, the block's shared memory fits
  // what the device grants one block (opt-in), and WMMA runs on sm_80 and later.
  const bool wmma_ok = !plan.wmma || lim.major >= 8;
  const bool fits = plan.blocks <= std::numeric_limits<int32_t>::max() &&
                    plan.smem_bytes <= lim.smem_optin && wmma_ok;
  if (!fits) return fused_chain(tucker, s, x, first, spatial, last, bias, relu);
  auto out = fused_output(x, s);
  if (s.N == 0 || s.Ho == 0 || s.Wo == 0) return fused_finish(x, out);
  const FusedOperands o = prepare_fused(tucker, s, x, first, spatial, last, bias);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_conv2d_cuda", [&] {
    const fused::Params<scalar_t> P{o.y1.const_data_ptr<scalar_t>(), o.spatial.const_data_ptr<scalar_t>(),
                                    o.last_t.const_data_ptr<scalar_t>(),
                                    o.bias.defined() ? o.bias.const_data_ptr<scalar_t>() : nullptr,
                                    out.mutable_data_ptr<scalar_t>(), fused_shape(s), plan, relu};
    if (tucker)
      launch<scalar_t, true>(P, stream);
    else
      launch<scalar_t, false>(P, stream);
  });
  return fused_finish(x, out);
}

at::Tensor cp_conv2d_cuda(const at::Tensor& x, const at::Tensor& first, const at::Tensor& spatial,
                          const at::Tensor& last, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  return fused_conv2d_cuda(false, x, first, spatial, last, bias, stride, padding, dilation, relu);
}

at::Tensor tucker_conv2d_cuda(const at::Tensor& x, const at::Tensor& first, const at::Tensor& core,
                              const at::Tensor& last, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  return fused_conv2d_cuda(true, x, first, core, last, bias, stride, padding, dilation, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(tdconv, CUDA, m) {
  m.impl("cp_conv2d", &cp_conv2d_cuda);
  m.impl("tucker_conv2d", &tucker_conv2d_cuda);
}

}  // namespace tdconv
