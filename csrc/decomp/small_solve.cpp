// The fused small solve of a CP-ALS mode update (small_solve.h): its use by the drivers on CUDA, and
// its host emulation tdconv::_cp_solve_emulated, which runs the kernel's block program on the CPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../common/checks.h"
#include "../common/host_emulation.h"
#include "../common/ops.h"
#include "cp_common.h"
#include "small_solve_host.h"

namespace tdconv {

SmallSolveFn& cuda_small_solve() {
  static SmallSolveFn fn = nullptr;
  return fn;
}

GraphCapture& cuda_graph_capture() {
  static GraphCapture fn = nullptr;
  return fn;
}

bool sweep_graphs_enabled() {
  const char* v = std::getenv("TDCONV_CUDA_GRAPHS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

namespace {
std::atomic<int64_t> engine_stats[kEngineStatCount];
}  // namespace

void count_engine_stat(EngineStat which, int64_t n) { engine_stats[which] += n; }

std::vector<int64_t> cuda_engine_stats() {
  std::vector<int64_t> out;
  for (int i = 0; i < kEngineStatCount; ++i) out.push_back(engine_stats[i].load());
  return out;
}

bool small_solve_enabled() {
  const char* v = std::getenv("TDCONV_CUDA_SMALL_SOLVE");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

void check_small_solve(const char* op, const std::vector<at::Tensor>& grams, const at::Tensor& m, double l2_reg,
                       int64_t max_rank, int64_t max_grams) {
  const std::string name = std::string("tdconv::") + op + ": ";
  TDCONV_CHECK(!grams.empty() && static_cast<int64_t>(grams.size()) <= max_grams, name, "1 to ", max_grams,
               " Gram matrices are needed, got ", grams.size());
  TDCONV_CHECK(std::isfinite(l2_reg) && l2_reg >= 0, name, "l2_reg must be finite and >= 0, got ", l2_reg);
  TDCONV_CHECK(m.dim() == 3, name, "m must be [B, I, R], got shape ", m.sizes());
  const int64_t B = m.size(0), R = m.size(2);
  TDCONV_CHECK(R >= 1, name, "the rank must be >= 1, got ", R);
  TDCONV_CHECK(R <= max_rank, name, "the rank must be in [1, ", max_rank, "], got ", R);
  TDCONV_CHECK_FLOAT(m, "m");
  for (const auto& g : grams) {
    TDCONV_CHECK(g.dim() == 3 && g.size(0) == B && g.size(1) == R && g.size(2) == R, name,
                 "every Gram matrix must be [", B, ", ", R, ", ", R, "], got ", g.sizes());
    TDCONV_CHECK_TYPE(g.scalar_type() == m.scalar_type(), name, "the Gram matrices must have m's dtype");
    TDCONV_CHECK_SAME_DEVICE(g, m, "a Gram matrix", "m");
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor> cp_solve_emulated(at::TensorList grams_in, const at::Tensor& m_in, double l2_reg) {
  std::vector<at::Tensor> grams;
  for (const auto& g : grams_in) grams.push_back(g.contiguous());
  check_small_solve("_cp_solve_emulated", grams, m_in, l2_reg, small_solve::kMaxRank, small_solve::kMaxGrams);
  TDCONV_CHECK(m_in.device().is_cpu(), "tdconv::_cp_solve_emulated: m must be on the CPU");
  const auto m = m_in.contiguous();
  auto u = at::empty_like(m);
  auto lam = at::empty({m.size(0), m.size(2)}, m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cp_solve_emulated", [&] {
    const auto P = small_solve::make_params<scalar_t>(grams, m, u, lam, l2_reg);
    emulate_blocks(m.size(0), small_solve::kThreads, small_solve::smem_bytes(P.R, sizeof(scalar_t)), 16,
                   [&](int64_t b, int t, unsigned char* smem, HostCtx& ctx) {
                     small_solve::block<scalar_t>(P, b, t, smem, ctx);
                   });
  });
  return {u, lam};
}

std::tuple<at::Tensor, at::Tensor> cp_solve(at::TensorList grams_in, const at::Tensor& m, double l2_reg,
                                            bool triangular) {
  std::vector<at::Tensor> grams(grams_in.begin(), grams_in.end());
  const int64_t any = std::numeric_limits<int64_t>::max();  // the ATen path has neither limit
  check_small_solve("_cp_solve", grams, m, l2_reg, /*max_rank=*/any, /*max_grams=*/any);
  auto out = cp_detail::solve_normalised(cp_detail::hadamard_grams(grams, -1), m, l2_reg, triangular);
  return {out.first, out.second};
}

}  // namespace

TORCH_LIBRARY_IMPL(tdconv, CPU, m) { m.impl("_cp_solve_emulated", &cp_solve_emulated); }
TORCH_LIBRARY_IMPL(tdconv, CompositeExplicitAutograd, m) { m.impl("_cp_solve", &cp_solve); }
TORCH_LIBRARY_IMPL(tdconv, CompositeImplicitAutograd, m) { m.impl("_cuda_engine_stats", &cuda_engine_stats); }

}  // namespace tdconv
