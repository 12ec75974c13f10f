// CUDA kernels of tdconv::cp_conv2d and tdconv::tucker_conv2d: y1 = x * first^T on cuBLAS, then one
// kernel for the spatial stage and the 1x1 conv back with the bias (and the ReLU). The block program
// is csrc/common/fused_tiles.h, shared with the host emulation that the tests run without a GPU;
// this file only launches it. float16 / bfloat16 run on tensor cores (WMMA, float32 accumulation),
// float32 / float64 on a SIMT loop. A call whose block would need more shared memory than the device
// grants runs the ATen chain (cuDNN) instead. See docs/kernels.md for what has run on a GPU.
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <limits>
#include <mutex>

#include "../common/checks.h"
#include "../common/fused_conv.h"

namespace tdconv {
namespace {

// What the device grants: shared memory per block (opt-in), read once per device.
int64_t smem_optin(int device) {
  static std::array<std::atomic<int64_t>, 64> cache{};
  TDCONV_CHECK(device >= 0 && device < 64, "tdconv: device index ", device, " out of range");
  int64_t v = cache[device].load();
  if (v == 0) {
    int smem = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    v = smem;
    cache[device] = v;
  }
  return v;
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

// Per kernel and device, once: the dynamic shared memory it may use raised to the device's opt-in
// limit (setting it per call would race between threads launching different sizes), and the
// architecture it was compiled for (a build for an older architecture JIT-compiled from PTX would run
// the tensor-core form as the slow per-lane loop: such a kernel is not used).
template <typename T, bool kTucker>
bool kernel_usable(int device) {
  constexpr bool wmma = fused::kUsesWmma<T>;
  static std::array<std::once_flag, 64> once;
  static std::array<bool, 64> usable;
  TDCONV_CHECK(device >= 0 && device < 64, "tdconv: device index ", device, " out of range");
  std::call_once(once[device], [&] {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    auto kernel = fused_conv_kernel<T, kTucker, wmma>;
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_optin(device))));
    usable[device] = !wmma || attr.ptxVersion >= 80;  // the PTX decides the WMMA form
  });
  return usable[device];
}

template <typename T, bool kTucker>
void launch(const fused::Params<T>& P, cudaStream_t stream) {
  fused_conv_kernel<T, kTucker, fused::kUsesWmma<T>><<<static_cast<unsigned>(P.plan.blocks), fused::kThreads,
                                        static_cast<size_t>(P.plan.smem_bytes), stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fused_conv2d_cuda(bool tucker, const at::Tensor& x, const at::Tensor& first, const at::Tensor& spatial,
                             const at::Tensor& last, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const char* op = tucker ? "tucker_conv2d" : "cp_conv2d";
  const ConvShape s = check_factorized_conv2d(op, tucker, x, first, spatial, last, bias, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // gradients are the autograd formula's job
  // The ATen calls below (cuBLAS's y1, the chain) run in x's dtype: under torch.autocast they would be
  // cast, and the kernel would read a y1 of another dtype.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const fused::Plan plan = fused_plan(s, x, tucker);
  const int device = x.device().index();
  bool compiled_ok = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_conv2d_cuda_check",
                                  [&] { compiled_ok = tucker ? kernel_usable<scalar_t, true>(device)
                                                                   : kernel_usable<scalar_t, false>(device); });
  // The launch is checked before it is made: the grid fits gridDim.x, the block's shared memory fits
  // what the device grants one block (opt-in), the kernel was compiled for sm_80+ where it uses WMMA.
  const bool fits = plan.blocks <= std::numeric_limits<int32_t>::max() && plan.smem_bytes <= smem_optin(device) &&
                    compiled_ok;
  if (!fits) {
    count_engine_stat(kFusedConvFallbacks);
    return fused_chain(tucker, s, x, first, spatial, last, bias, relu);
  }
  auto out = fused_output(x, s);
  if (s.N == 0 || s.Ho == 0 || s.Wo == 0) return out;
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
  count_engine_stat(kFusedConvLaunches);
  return out;
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
