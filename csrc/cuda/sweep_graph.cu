// CUDA graphs for the CP-ALS drivers: a sweep of a small layer is a few dozen small launches whose
// host cost dominates; captured once per call, it is replayed as one graph launch. Used by cp_als on
// CUDA with TDCONV_CUDA_GRAPHS=1 (off until it has run on a GPU). A capture that fails leaves the
// call on the eager path (with the cleanup of torch 2.14's CUDAGraph, the version this extension is
// built against and pinned to).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <functional>
#include <memory>

#include "../common/ops.h"

namespace tdconv {
namespace {

// Captures body() on a stream made for the purpose (never one of torch's pooled streams, which other
// threads may be using: in thread-local capture mode their work would be recorded into this graph),
// after one eager run there (cuBLAS handles and workspaces then exist before the capture). Thread-local
// capture mode: the groups of decompose_batch run from several threads, whose allocations must not
// invalidate it.
std::function<void()> capture_sweep(const std::function<void()>& body, c10::DeviceIndex device) {
  const c10::cuda::CUDAGuard guard(device);
  auto caller = c10::cuda::getCurrentCUDAStream(device);
  cudaStream_t raw = nullptr;
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));
  auto side = c10::cuda::getStreamFromExternal(raw, device);
  cudaEvent_t ready;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(ready, caller.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(raw, ready, 0));
  auto graph = std::make_shared<at::cuda::CUDAGraph>();
  bool captured = false;
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    body();
    try {
      graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        body();
        graph->capture_end();
        captured = true;
      } catch (const std::exception&) {
        cudaGraph_t partial = nullptr;  // end the broken capture so the stream works again
        cudaStreamEndCapture(raw, &partial);
        if (partial != nullptr) cudaGraphDestroy(partial);
        (void)cudaGetLastError();
      }
    } catch (const std::exception&) {
      (void)cudaGetLastError();
    }
  }
  // The caller's stream waits for the warm-up and the capture; the stream is destroyed once its
  // work is done (cudaStreamDestroy does not wait, the driver releases it afterwards).
  C10_CUDA_CHECK(cudaEventRecord(ready, raw));
  C10_CUDA_CHECK(cudaStreamWaitEvent(caller.stream(), ready, 0));
  C10_CUDA_CHECK(cudaEventDestroy(ready));
  C10_CUDA_CHECK(cudaStreamDestroy(raw));
  count_engine_stat(captured ? kGraphCaptures : kGraphCaptureFailures);
  if (!captured) return {};
  return [graph] { graph->replay(); };  // on the current stream
}

const bool registered = (cuda_graph_capture() = &capture_sweep, true);

}  // namespace
}  // namespace tdconv
