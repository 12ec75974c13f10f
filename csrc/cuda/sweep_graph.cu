// CUDA graphs for the CP-ALS drivers: a sweep of a small layer is a few dozen small launches whose
// host cost dominates; captured once per call, it is replayed as one graph launch. Used by cp_als on
// CUDA with TDCONV_CUDA_GRAPHS=1 (off until it has run on a GPU). A capture that fails leaves the
// call on the eager path (with the cleanup of torch 2.14's CUDAGraph, the version this extension is
// built against and pinned to).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <array>
#include <functional>
#include <memory>
#include <mutex>

#include "../common/checks.h"
#include "../common/ops.h"

namespace tdconv {
namespace {

// One stream per device for captures, made once and never destroyed (a stream per capture would leak
// the cuBLAS workspace torch keeps per stream, and strand the warm-up's cached blocks), and used by one
// capture at a time. It is never one of torch's pooled streams, which other threads may be using: in
// thread-local capture mode their work would be recorded into this graph.
struct CaptureStream {
  std::mutex mutex;
  cudaStream_t stream = nullptr;
};

CaptureStream& capture_stream(c10::DeviceIndex device) {
  static std::array<CaptureStream, 64> streams;
  TDCONV_CHECK(device >= 0 && device < 64, "tdconv: device index ", static_cast<int>(device), " out of range");
  return streams[device];
}

// Captures body() on the device's capture stream after one eager run there (cuBLAS handles and
// workspaces then exist before the capture). Thread-local capture mode: the groups of decompose_batch
// run from several threads, whose allocations must not invalidate it.
std::function<void()> capture_sweep(const std::function<void()>& body, c10::DeviceIndex device) {
  const c10::cuda::CUDAGuard guard(device);
  auto& cs = capture_stream(device);
  const std::lock_guard<std::mutex> lock(cs.mutex);
  if (cs.stream == nullptr) C10_CUDA_CHECK(cudaStreamCreateWithFlags(&cs.stream, cudaStreamNonBlocking));
  cudaStream_t raw = cs.stream;
  auto caller = c10::cuda::getCurrentCUDAStream(device);
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
        graph.reset();  // while its capture stream still exists
      }
    } catch (const std::exception&) {
      (void)cudaGetLastError();
      graph.reset();
    }
  }
  // The caller's stream waits for the warm-up and the capture.
  C10_CUDA_CHECK(cudaEventRecord(ready, raw));
  C10_CUDA_CHECK(cudaStreamWaitEvent(caller.stream(), ready, 0));
  C10_CUDA_CHECK(cudaEventDestroy(ready));
  count_engine_stat(captured ? kGraphCaptures : kGraphCaptureFailures);
  if (!captured) return {};
  return [graph] { graph->replay(); };  // on the current stream
}

const bool registered = (cuda_graph_capture() = &capture_sweep, true);

}  // namespace
}  // namespace tdconv
