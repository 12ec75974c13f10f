"""torch.library.opcheck on every registered tdconv op; an op without a sample here fails the suite."""
import pytest
import torch

import tdconv


def _samples(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, generator=g).to(device)
    init = [f.expand(2, -1, -1).contiguous()
            for f in tdconv.initialize_cp(x[0], 3, init="random", seed=0).factors]
    fill = [torch.randn(2, s, max(7 - s, 0), dtype=torch.float64, generator=g).to(device) for s in x.shape[1:]]
    _, factors = torch.ops.tdconv.tucker_hosvd(x, [3, 2], [0, 1])
    y = torch.randn(2, 4, 5, 3, generator=g).to(device)
    u = torch.randn(2, 5, 3, generator=g).to(device)
    xc = torch.randn(2, 4, 6, 7, generator=g).to(device)
    conv = [torch.randn(s, generator=g).to(device) for s in [(3, 4), (3, 3, 3), (5, 3), (5,)]]
    tucker = [torch.randn(s, generator=g).to(device) for s in [(3, 4), (2, 3, 3, 1), (5, 2), (5,)]]
    return {
        "cp_als": [(x, init, 5, 0.0, 0.0, 1)],
        "cp_init_svd": [(x, 7, fill)],
        "cp_epc": [(x, torch.ones(2, 3, dtype=torch.float64, device=device), init,
                    torch.full((2,), 0.5, dtype=torch.float64, device=device), 3, 0.0, 1)],
        "tucker_hosvd": [(x, [3, 2], [0, 1])],
        "tucker_hooi": [(x, factors, [0, 1], 3, 0.0, 1)],
        "mode_contract": [(y, u, 2)],
        "cp_conv2d": [(xc, *conv, [1, 1], [1, 1], [1, 1]), (xc, *conv[:3], None, [2, 1], [0, 1], [1, 2], True),
                      (xc.to(memory_format=torch.channels_last), *conv, [1, 1], [1, 1], [1, 1], True)],
        "tucker_conv2d": [(xc, *tucker, [1, 1], [1, 0], [1, 1]),
                          (xc, *tucker[:3], None, [2, 1], [0, 1], [2, 1], True),
                          (xc.to(memory_format=torch.channels_last), *tucker, [1, 1], [1, 1], [1, 1])],
        "pack_factors": [(*tucker, True), (*conv[:3], None, False)],
        "factorized_conv2d_prepacked": [
            (xc, *tucker, [1, 1], [1, 0], [1, 1], True, True, *_packs(tucker, True)),
            (xc, *conv[:3], None, [2, 1], [0, 1], [1, 2], False, False, *_packs(conv[:3] + [None], False))],
    }


def _packs(factors, tucker):
    if factors[0].device.type != "cpu":  # CPU-only ops: a placeholder that the CPU-only test skips
        return (None,) * 4
    first, core, last, bias = torch.ops.tdconv.pack_factors(*factors, tucker)
    return first, core if tucker else None, last, bias if factors[3] is not None else None


def _registered_ops():
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("tdconv::"))


# Ops without tensor arguments (facts about the build), which opcheck does not apply to.
QUERY_OPS = {"cpu_isa": ("avx2", "baseline")}
# Test helpers (the CUDA kernels' block program run on the CPU, their launch plan): tests/test_gpu_kernels.py.
TEST_OPS = ("_cp_solve", "_cp_solve_emulated", "_cuda_engine_stats", "_fused_conv2d_emulated", "_fused_conv2d_plan")


def test_every_op_has_a_sample(require_ext):
    assert _registered_ops() == sorted([*_samples("cpu"), *QUERY_OPS, *TEST_OPS])


def test_query_ops(require_ext):
    for op, answers in QUERY_OPS.items():
        assert getattr(torch.ops.tdconv, op)() in answers


CONV_OPS = ("cp_conv2d", "tucker_conv2d")
CPU_ONLY = ("pack_factors", "factorized_conv2d_prepacked")


@pytest.mark.parametrize("op", ["cp_als", "cp_epc", "cp_init_svd", "tucker_hosvd", "tucker_hooi", "mode_contract", *CONV_OPS,
                                "pack_factors", "factorized_conv2d_prepacked"])
def test_opcheck(require_ext, device, op):
    if op in CPU_ONLY and device.type != "cpu":
        pytest.skip(f"{op} is CPU only")
    samples = _samples(device)[op]
    # The engine ops are not differentiable: their schema and fake kernels are what is checked.
    tests = (("test_schema", "test_faketensor") if op not in CONV_OPS
             else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    for args in samples:
        torch.library.opcheck(getattr(torch.ops.tdconv, op).default, args, test_utils=tests)
