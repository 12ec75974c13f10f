// Module init and the one place where every tdconv op schema is declared. Backends only add
// implementations (TORCH_LIBRARY_IMPL) in their own files.
#include <Python.h>
#include <torch/library.h>

#include "common/ops.h"

#ifndef TDCONV_TORCH_VERSION
#define TDCONV_TORCH_VERSION "unknown"
#endif

extern "C" {
// `import tdconv._C` loads this library, which registers the ops below with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tdconv compiled ops", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef TDCONV_WITH_CUDA
  PyModule_AddIntConstant(m, "cuda_built", 1);
#else
  PyModule_AddIntConstant(m, "cuda_built", 0);
#endif
  PyModule_AddStringConstant(m, "torch_version", TDCONV_TORCH_VERSION);
  return m;
}
}

TORCH_LIBRARY(tdconv, m) {
  // Engine: CP-ALS, its SVD initialisation, Tucker HOSVD / HOOI. Every tensor carries a leading
  // batch dimension so that many equally shaped weight tensors are decomposed in one call.
  m.def("cp_als(Tensor x, Tensor[] init, int n_iter_max, float tol, float l2_reg, int check_every)"
        " -> (Tensor weights, Tensor[] factors, Tensor errors, Tensor n_iter)");
  m.def("cp_init_svd(Tensor x, int rank, Tensor[] random_fill) -> Tensor[]");
  // Error preserving correction: the smallest sum(weights^2) within ||x - cp|| <= delta.
  m.def("cp_epc(Tensor x, Tensor weights, Tensor[] factors, Tensor delta, int n_iter_max, float tol,"
        " int check_every) -> (Tensor weights, Tensor[] factors, Tensor norms, Tensor n_iter, Tensor errors)");
  m.def("tucker_hosvd(Tensor x, int[] ranks, int[] modes) -> (Tensor core, Tensor[] factors)");
  m.def("tucker_hooi(Tensor x, Tensor[] init, int[] modes, int n_iter_max, float tol, int check_every)"
        " -> (Tensor core, Tensor[] factors, Tensor errors, Tensor n_iter)");
  // Kernel: contract one mode of y [B, ..., R] with a factor u [B, J, R], keeping the rank index.
  m.def("mode_contract(Tensor y, Tensor u, int dim) -> Tensor");
  // Factorised convolutions in one op each, zero padding; the output has the input's layout
  // (channels_last for a channels_last input that is not also contiguous, contiguous otherwise);
  // relu: max(., 0) on the result (a following ReLU fused into the op).
  // CP: 1x1 conv -> depthwise kh x kw conv -> 1x1 conv + bias.
  m.def("cp_conv2d(Tensor x, Tensor first, Tensor spatial, Tensor last, Tensor? bias, int[2] stride,"
        " int[2] padding, int[2] dilation, bool relu=False) -> Tensor");
  // Tucker-2: 1x1 conv -> kh x kw core conv -> 1x1 conv + bias.
  m.def("tucker_conv2d(Tensor x, Tensor first, Tensor core, Tensor last, Tensor? bias, int[2] stride,"
        " int[2] padding, int[2] dilation, bool relu=False) -> Tensor");
  // The eval-mode call of a prepared layer (CPU): the factors packed once by pack_factors, then the
  // op of cp_conv2d (tucker=False) or tucker_conv2d (tucker=True) reading them. No autograd.
  m.def("pack_factors(Tensor first, Tensor spatial, Tensor last, Tensor? bias, bool tucker)"
        " -> (Tensor first_packed, Tensor core_packed, Tensor last_packed, Tensor bias_packed)");
  m.def("factorized_conv2d_prepacked(Tensor x, Tensor first, Tensor spatial, Tensor last, Tensor? bias,"
        " int[2] stride, int[2] padding, int[2] dilation, bool relu, bool tucker, Tensor first_packed,"
        " Tensor? core_packed, Tensor last_packed, Tensor? bias_packed) -> Tensor");
  // The block program of the CUDA fused convs run on the CPU (csrc/common/fused_tiles.h): kThreads host
  // threads per block, a barrier for __syncthreads; refuses a plan needing more than smem_limit bytes.
  // For tests of the kernel's tiling without a GPU; slow.
  m.def("_fused_conv2d_emulated(Tensor x, Tensor first, Tensor spatial, Tensor last, Tensor? bias, int[2] stride,"
        " int[2] padding, int[2] dilation, bool relu, bool tucker, int smem_limit) -> Tensor");
  // The fused small solve of a CP-ALS mode update (csrc/decomp/small_solve.h) run on the CPU: the Grams
  // to multiply, M [B, I, R] -> (U with unit columns, lambda). For tests without a GPU.
  m.def("_cp_solve_emulated(Tensor[] grams, Tensor m, float l2_reg) -> (Tensor u, Tensor lam)");
  // The ATen path of the same step (cp_common.h's solve_normalised), on any device: cholesky_solve, or
  // (`triangular`, what CUDA runs) two triangular solves. For tests of the CUDA arithmetic on the CPU.
  m.def("_cp_solve(Tensor[] grams, Tensor m, float l2_reg, bool triangular) -> (Tensor u, Tensor lam)");
  // Counters of the CUDA paths since load: [graph captures, failed captures, graph replays, fused small
  // solves, fused conv launches, fused conv calls that ran the ATen chain instead].
  m.def("_cuda_engine_stats() -> int[]");
  // The CUDA launch plan for these shapes and dtype: [blocks, padded R_out, shared-memory bytes, wmma].
  m.def("_fused_conv2d_plan(Tensor x, Tensor first, Tensor spatial, Tensor last, int[2] stride, int[2] padding,"
        " int[2] dilation, bool tucker) -> int[]");
  // Which compiled variant of the CPU kernels' vector loops runs here: "avx2" or "baseline".
  m.def("cpu_isa() -> str");
}

// The drivers are written on ATen and run on whatever device their input lives on.
TORCH_LIBRARY_IMPL(tdconv, CompositeExplicitAutograd, m) {
  m.impl("cp_als", &tdconv::cp_als);
  m.impl("cp_init_svd", &tdconv::cp_init_svd);
  m.impl("cp_epc", &tdconv::cp_epc);
  m.impl("tucker_hosvd", &tdconv::tucker_hosvd);
  m.impl("tucker_hooi", &tdconv::tucker_hooi);
}
