// Declarations shared by the tdconv sources: the backend-independent drivers (decomp/) and the
// entry points of the backend kernels, called through the dispatcher so that each runs on the
// tensor's own device. The argument-check macros are in checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <functional>
#include <optional>
#include <utility>
#include <tuple>
#include <vector>

namespace tdconv {

// ---- backend kernels (csrc/cpu, csrc/cuda) ------------------------------------------------------
// y: [B, d_1, ..., d_k, R], u: [B, d_dim, R]  ->  [B, d_1, .., (d_dim removed), .., d_k, R]
// out[b, ..., r] = sum_j y[b, .., j, .., r] * u[b, j, r]: one mode of a Khatri-Rao contraction.
at::Tensor mode_contract(const at::Tensor& y, const at::Tensor& u, int64_t dim);

// Shape arithmetic for mode_contract: P = prod(d_1..d_{dim-1}), J = d_dim, Q = prod(d_{dim+1}..d_k).
struct ContractShape {
  int64_t B, P, J, Q, R;
  std::vector<int64_t> out_sizes;
};
ContractShape check_mode_contract(const at::Tensor& y, const at::Tensor& u, int64_t dim);

// Shapes of a factorised convolution x [N, C_in, H, W] -> y [N, C_out, Ho, Wo] through R_in channels
// after the first 1x1 conv and R_out channels before the last one (CP: R_in == R_out == R).
struct ConvShape {
  int64_t N, C_in, H, W, R_in, R_out, C_out, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
};
// The layout rule of the fused convs, on every backend (and of the fake kernel, tdconv.ops.output_memory_format):
// NHWC in and channels_last out for an x that is channels_last and not also contiguous, NCHW otherwise.
inline bool reads_nhwc(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}
// Checks of the arguments of cp_conv2d (spatial [R, kh, kw]) and tucker_conv2d (spatial = the core
// [R_out, R_in, kh, kw]); `op` names the op in the messages (csrc/common/conv_checks.cpp).
ConvShape check_factorized_conv2d(const char* op, bool tucker, const at::Tensor& x, const at::Tensor& first,
                                  const at::Tensor& spatial, const at::Tensor& last,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation);

// ---- decomposition drivers (csrc/decomp), batched over dim 0 ------------------------------------
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> cp_als(
    const at::Tensor& x, at::TensorList init, int64_t n_iter_max, double tol, double l2_reg,
    int64_t check_every);

std::vector<at::Tensor> cp_init_svd(const at::Tensor& x, int64_t rank, at::TensorList random_fill);

// Returns (weights, factors, norm history sum(lambda^2)/||X||^2 [B, n_iter_max], n_iter, relative errors).
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> cp_epc(
    const at::Tensor& x, const at::Tensor& weights, at::TensorList factors, const at::Tensor& delta,
    int64_t n_iter_max, double tol, int64_t check_every);

std::tuple<at::Tensor, std::vector<at::Tensor>> tucker_hosvd(const at::Tensor& x, at::IntArrayRef ranks,
                                                            at::IntArrayRef modes);

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> tucker_hooi(
    const at::Tensor& x, at::TensorList init, at::IntArrayRef modes, int64_t n_iter_max, double tol,
    int64_t check_every);

// ---- the fused small solve of a CP-ALS mode update (decomp/small_solve.h) ------------------------
// (U with unit columns, lambda) from the Grams (grams[skip] left out), M and the ridge: one kernel.
using SmallSolveFn = std::pair<at::Tensor, at::Tensor> (*)(const std::vector<at::Tensor>& grams, int64_t skip,
                                                          const at::Tensor& m, double l2_reg);
// The CUDA kernel (csrc/cuda/small_solve.cu sets it at load time); null in a CPU-only build.
SmallSolveFn& cuda_small_solve();
// TDCONV_CUDA_SMALL_SOLVE=1: the drivers use it on CUDA (off until it has run on a GPU).
bool small_solve_enabled();
// Argument checks of the R x R step: 1..max_grams Grams [B, R, R], m [B, I, R], 1 <= R <= max_rank, one dtype
// and device, l2_reg finite and >= 0.
void check_small_solve(const char* op, const std::vector<at::Tensor>& grams, const at::Tensor& m, double l2_reg,
                       int64_t max_rank, int64_t max_grams);

// CUDA graphs of the sweeps (csrc/cuda/sweep_graph.cu sets it at load time; null in a CPU-only build):
// body() captured once, after one eager run, on a side stream; the returned function replays it on
// the current stream; empty where the capture failed.
using GraphCapture = std::function<void()> (*)(const std::function<void()>& body, c10::DeviceIndex device);
GraphCapture& cuda_graph_capture();
// TDCONV_CUDA_GRAPHS=1: cp_als replays each sweep from a CUDA graph (off until it has run on a GPU).
bool sweep_graphs_enabled();

// What the CUDA paths did, counted since the library loaded (tdconv::_cuda_engine_stats), so that tests
// and benchmarks can tell a path that ran from one that silently fell back.
enum EngineStat { kGraphCaptures, kGraphCaptureFailures, kGraphReplays, kSmallSolves, kFusedConvLaunches,
                  kFusedConvFallbacks, kEngineStatCount };
void count_engine_stat(EngineStat which, int64_t n = 1);

// ---- small linear-algebra helpers shared by the drivers (decomp/linalg.cpp) ---------------------
// Leading `rank` eigenvectors (descending eigenvalues) of the symmetric batch G [B, n, n], with
// deterministic signs (the largest-magnitude entry of each column is positive).
at::Tensor leading_eigvecs(const at::Tensor& gram, int64_t rank);
// Gram matrix of the mode-`mode` unfolding of the batched tensor x [B, I_0, ..]: [B, I_mode, I_mode].
at::Tensor unfolding_gram(const at::Tensor& x, int64_t mode);
// x times U^T along `mode` (U: [B, I_mode, r]): the mode's size becomes r.
at::Tensor mode_dot_t(const at::Tensor& x, const at::Tensor& u, int64_t mode);
// Make the largest-magnitude entry of every column of U [B, n, r] positive.
at::Tensor fix_signs(const at::Tensor& u);

// Per-member progress of an iterative decomposition of a batch: the error history, sweep counts and
// which members still run. Convergence (|e_{k-1} - e_k| < tol) is decided on the device; a member
// whose error is not finite stops (the caller keeps its last iterate) and is marked +inf in the
// history. The only host synchronisation is keep_going(), every check_every sweeps.
class SweepTracker {
 public:
  SweepTracker(int64_t batch, int64_t n_iter_max, double tol, int64_t check_every, const at::TensorOptions& opts);
  // Records sweep `it`'s relative errors [B] (float64); returns the members whose sweep is accepted.
  // Where `may_settle` ([B] bool) is given, only its members can stop on convergence this sweep (a
  // sweep whose step the caller rejected repeats the last value without having converged).
  at::Tensor record(int64_t it, const at::Tensor& err, const at::Tensor& may_settle = at::Tensor());
  // Whether the caller must restore the previous iterate of the members not in `step`. Where the
  // stop flag is read every sweep anyway (check_every == 1, the CPU) the common case where every
  // member stepped is read too, saving the restoring launches.
  bool must_freeze(const at::Tensor& step) const;
  // At every check_every-th sweep: false once every member has stopped. `extra` (a bool scalar
  // tensor) is read in the same transfer into *extra_out.
  bool keep_going(int64_t it, const at::Tensor& extra = at::Tensor(), bool* extra_out = nullptr);
  bool is_check(int64_t it) const { return (it + 1) % check_every_ == 0; }
  const at::Tensor& active() const { return active_; }
  at::Tensor errors, n_iter;

 private:
  at::Tensor active_;
  double tol_;
  int64_t check_every_;
};

}  // namespace tdconv
