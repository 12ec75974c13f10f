// Runs a CUDA block program (a TDCONV_HD function of (block, thread, shared memory, ctx)) on the CPU:
// every block in turn, with one host thread per CUDA thread and a barrier for __syncthreads, over
// shared memory filled with 0xFF bytes (NaN for floating-point) before each block, so that a read of
// a value the program did not write shows up. For tests of device code without a GPU; slow.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace tdconv {

class HostBarrier {
 public:
  explicit HostBarrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const int64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  int64_t gen_ = 0;
};

// What the block program calls for __syncthreads.
struct HostCtx {
  HostBarrier* barrier;
  void sync() { barrier->wait(); }
};

// f(block, tid, smem, ctx) for every block in [0, blocks) and thread in [0, threads).
template <typename F>
void emulate_blocks(int64_t blocks, int threads, int64_t smem_bytes, int64_t align, F&& f) {
  std::vector<unsigned char> buffer(static_cast<size_t>(smem_bytes + align));
  const auto misalign = reinterpret_cast<uintptr_t>(buffer.data()) % static_cast<uintptr_t>(align);
  unsigned char* smem = buffer.data() + (misalign ? align - static_cast<int64_t>(misalign) : 0);
  for (int64_t b = 0; b < blocks; ++b) {
    for (auto& c : buffer) c = 0xFF;
    HostBarrier barrier(threads);
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads));
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        HostCtx ctx{&barrier};
        f(b, t, smem, ctx);
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace tdconv
