import itertools
import os
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

import tdconv

# ---------------------------------------------------------------------------------------------- fused ops
METHOD_RANKS = {"cp": 3, "cp4": 3, "tucker": (4, 3)}


def _fused_pair(cfg, method="cp", dtype=torch.float64, device="cpu", cin=5, cout=7, rank=None):
    torch.manual_seed(0)
    rank = rank or METHOD_RANKS[method]
    unfused = tdconv.FactorizedConv2d(cin, cout, method=method, rank=rank, dtype=dtype, device=device,
                                      implementation="unfused", **cfg)
    fused = tdconv.FactorizedConv2d(cin, cout, method=method, rank=rank, dtype=dtype, device=device,
                                    implementation="fused", **cfg)
    fused.load_state_dict(unfused.state_dict())
    return fused, unfused


FUSED_CONFIGS = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d, bias=b)
    for k, s, p, d, b in itertools.product([1, 3, 5, 7, (3, 1)], [1, 2], [0, 1, 2, "same"], [1, 2], [True, False])
    if not (p == "same" and s != 1)
]


def _skip_without_kernel(method, device):
    if device.type not in tdconv.ops.FUSED_KERNELS["tucker_conv2d" if method == "tucker" else "cp_conv2d"]:
        pytest.skip(f"{method} has no {device.type} kernel")


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_fused_equals_unfused(require_ext, device, method):
    _skip_without_kernel(method, device)
    g = torch.Generator().manual_seed(0)
    for cfg in FUSED_CONFIGS:
        fused, unfused = _fused_pair(cfg, method, device=device)
        for batch in (0, 1, 7):
            x = torch.randn(batch, 5, 15, 17, dtype=torch.float64, generator=g).to(device)
            out = fused(x)
            assert out.is_contiguous() or out.numel() == 0  # the layout of nn.Conv2d's output
            torch.testing.assert_close(out, unfused(x), atol=1e-12, rtol=1e-10, msg=f"{method} {cfg}")
    # odd sizes, channels_last and non-contiguous inputs
    fused, unfused = _fused_pair(dict(kernel_size=3, stride=2, padding=1), method, device=device)
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64, generator=g).to(device)
    for xi in (x, x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
               torch.randn(3, 5, 14, 9, dtype=torch.float64, generator=g).to(device)[:, :, ::2]):
        torch.testing.assert_close(fused(xi), unfused(xi), atol=1e-12, rtol=1e-10)


def test_fused_tiles_cover_large_images(require_ext, device):
    # Images large enough to be cut into tiles of a few rows (each thread's scratch is bounded), and
    # padding wide enough that whole rows of taps read only zeros at the borders; more channels than
    # one CUDA block's tile.
    for method, cfg in [("cp", dict(kernel_size=3, padding=1)), ("tucker", dict(kernel_size=5, padding=4, dilation=2)),
                        ("tucker", dict(kernel_size=3, stride=2, padding=1)), ("cp", dict(kernel_size=5, padding=4))]:
        fused, unfused = _fused_pair(cfg, method, cin=32, cout=80, rank=20 if method == "cp" else (24, 16),
                                     device=device)
        x = torch.randn(2, 32, 67, 45, dtype=torch.float64).to(device)
        torch.testing.assert_close(fused(x), unfused(x), atol=1e-11, rtol=1e-10, msg=f"{method} {cfg}")
    # A 1x1 image under a padded 3x3 kernel: only the centre tap is live.
    fused, unfused = _fused_pair(dict(kernel_size=3, padding=1), "tucker", cin=16, cout=16, rank=(8, 8))
    x = torch.randn(5, 16, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(fused(x), unfused(x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", ["cp", "tucker"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_cpu_paths_and_partial_panels(require_ext, method, dtype):
    # The CPU kernel packs the factors into panels of 64 bytes of columns (16 float32 / 8 float64) for its
    # micro-kernel when a call has at least 256 output pixels, and leaves the 1x1 stages to BLAS below
    # that: both regimes, with channels and ranks that leave the last panel partly filled and blocks of
    # fewer than 6 pixels, stride 2 and dilation 2 (Tucker pixels grouped by their live taps).
    if os.environ.get("TDCONV_CPU_ISA") == "baseline":  # run so by test_fused_cpu_threads_and_baseline_isa
        assert torch.ops.tdconv.cpu_isa() == "baseline"
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-10)
    rank = 19 if method == "cp" else (21, 19)
    g = torch.Generator().manual_seed(1)
    for cfg in (dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=2, dilation=2)):
        fused, unfused = _fused_pair(cfg, method, dtype=dtype, cin=37, cout=41, rank=rank)
        for shape in ((1, 37, 5, 7), (3, 37, 17, 13), (41, 37, 2, 3)):  # 35 / 663 / 246 output pixels (stride 1)
            x = torch.randn(*shape, dtype=dtype, generator=g)
            torch.testing.assert_close(fused(x), unfused(x), **tol, msg=f"{method} {cfg} {shape}")


def test_fused_random_configurations(require_ext):
    # A seeded sweep over shapes the fixed grids above do not reach: rank 1, a single output channel,
    # channel counts around the 6-row and 8 / 16-column blocks, pixels around the packing threshold,
    # kernels larger than the image, taps that all read padding for some pixels.
    rng = random.Random(0)
    for case in range(40):
        method = rng.choice(["cp", "tucker"])
        cin, cout = rng.randint(1, 40), rng.randint(1, 40)
        k = (rng.choice([1, 2, 3, 5]), rng.choice([1, 3, 4]))
        d = (rng.randint(1, 2), rng.randint(1, 2))
        pad = (rng.randint(0, 3), rng.randint(0, 3))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        h = rng.randint(max(1, d[0] * (k[0] - 1) + 1 - 2 * pad[0]), 19)
        w = rng.randint(max(1, d[1] * (k[1] - 1) + 1 - 2 * pad[1]), 19)
        rank = rng.randint(1, 20) if method == "cp" else (rng.randint(1, cout), rng.randint(1, cin))
        cfg = dict(kernel_size=k, stride=stride, padding=pad, dilation=d, bias=rng.random() < 0.5)
        fused, unfused = _fused_pair(cfg, method, cin=cin, cout=cout, rank=rank)
        x = torch.randn(rng.randint(0, 9), cin, h, w, dtype=torch.float64)
        torch.testing.assert_close(fused(x), unfused(x), atol=1e-11, rtol=1e-10,
                                   msg=f"case {case}: {method} {cin}->{cout} rank {rank} {cfg} {tuple(x.shape)}")


def test_fused_cpu_threads_and_baseline_isa(require_ext, tmp_path):
    # The tiles depend on the thread count; the vector loops are compiled twice (AVX2 + FMA, baseline)
    # and the baseline ones run only on CPUs without AVX2, or with TDCONV_CPU_ISA=baseline.
    cases = [("cp", dict(kernel_size=3, padding=1), 19), ("tucker", dict(kernel_size=3, stride=2, padding=1), (21, 19)),
             ("cp", dict(kernel_size=5, padding=2, dilation=2), 8)]
    threads = torch.get_num_threads()
    try:
        for method, cfg, rank in cases:
            fused, unfused = _fused_pair(cfg, method, dtype=torch.float32, cin=37, cout=41, rank=rank)
            x = torch.randn(5, 37, 13, 11)
            with torch.no_grad():
                expected = unfused(x)
                for n in (1, 3):
                    torch.set_num_threads(n)
                    torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=1e-4, msg=f"{method} {n} threads")
    finally:
        torch.set_num_threads(threads)
    # The baseline loops: the partial-panel test above, in a process that selects them, on the same
    # tdconv as this process (the installed one, not a source tree in the working directory).
    env = dict(os.environ, TDCONV_CPU_ISA="baseline", PYTHONPATH=os.path.dirname(os.path.dirname(tdconv.__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"{os.path.abspath(__file__)}::test_fused_cpu_paths_and_partial_panels"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "4 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("method", ["cp", "tucker"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_fused_low_precision(require_ext, device, method, dtype, tol):
    # Judged against the float64 result: float16 / bfloat16 inputs and factors accumulate in float32,
    # so the error is the rounding of the inputs, of the output (and, on CUDA, of the first
    # intermediate): a few ulps of the dtype.
    _skip_without_kernel(method, device)
    fused, unfused = _fused_pair(dict(kernel_size=3, padding=1), method, cin=16, cout=24,
                                 rank=8 if method == "cp" else (12, 8), device=device)
    x = torch.randn(4, 16, 9, 9, dtype=torch.float64).to(device)
    exact = unfused(x)
    got = fused.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and fused.first.dtype == dtype
    err = (got.double() - exact).abs().max().item() / exact.abs().max().item()
    # The chain of PyTorch's own convolutions in the same precision is the baseline: the fused op may be at
    # most twice as far from the float64 result (it rounds fewer intermediates).
    chain = unfused.to(dtype)(x.to(dtype))
    chain_err = (chain.double() - exact).abs().max().item() / exact.abs().max().item()
    assert err < tol and err <= 2 * chain_err + 1e-7, (err, chain_err)


@pytest.mark.parametrize("op", ["cp_conv2d", "tucker_conv2d"])
def test_fused_gradcheck_and_opcheck(require_ext, device, op):
    _skip_without_kernel("tucker" if op == "tucker_conv2d" else "cp", device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, generator=g).to(device).requires_grad_()
    spatial = (3, 3, 3) if op == "cp_conv2d" else (2, 3, 3, 2)
    params = [torch.randn(s, dtype=torch.float64, generator=g).to(device).requires_grad_()
              for s in [(3, 4), spatial, (5, 3 if op == "cp_conv2d" else 2), (5,)]]
    fn = getattr(tdconv.ops, op)
    for stride, padding, dilation in [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (1, 2))]:
        assert torch.autograd.gradcheck(lambda *t: fn(*t, stride, padding, dilation), (x, *params))
        torch.library.opcheck(getattr(torch.ops.tdconv, op).default,
                              (x, *params, list(stride), list(padding), list(dilation)))
    # without bias
    assert torch.autograd.gradcheck(lambda *t: fn(*t, None, (1, 1), (1, 1), (1, 1)), (x, *params[:3]))


def _tdconv_ops(graph) -> set:
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "tdconv" in str(n.target)}


@pytest.mark.parametrize("implementation", ["fused", "auto"])
@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_fused_under_torch_compile_and_export(require_ext, method, implementation):
    # Inference (no_grad, eval): the fused op itself must be in the graphs, not the chain.
    torch.manual_seed(0)
    model = nn.Sequential(tdconv.FactorizedConv2d(8, 16, 3, padding=1, method=method, rank=4,
                                                  implementation=implementation), nn.ReLU(),
                          tdconv.FactorizedConv2d(16, 8, 3, stride=2, padding=1, method=method, rank=4,
                                                  implementation=implementation)).eval()
    op = "tdconv.tucker_conv2d" if method == "tucker" else "tdconv.cp_conv2d"
    x = torch.randn(2, 8, 9, 9)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.graph)
        return gm.forward

    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        torch.testing.assert_close(compiled(x), eager)
        assert graphs and any(op in t for t in _tdconv_ops(graphs[0])), graphs[0]
        exported = torch.export.export(model, (x,))
        assert any(op in t for t in _tdconv_ops(exported.graph)), exported.graph
        torch.testing.assert_close(exported.module()(x), eager)
        traced = torch.jit.trace(model, (x,))
        assert op.replace(".", "::") in str(traced.inlined_graph)
        torch.testing.assert_close(traced(x), eager)


@pytest.mark.parametrize("method", ["cp", "tucker"])
def test_training_through_the_fused_op_under_torch_compile(require_ext, method):
    torch.manual_seed(0)
    model = nn.Sequential(tdconv.FactorizedConv2d(8, 16, 3, padding=1, method=method, rank=4, implementation="fused"),
                          nn.ReLU(), tdconv.FactorizedConv2d(16, 8, 3, stride=2, padding=1, method=method, rank=4,
                                                             implementation="fused"))
    x = torch.randn(2, 8, 9, 9)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    compiled_grads = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_bad_input(require_ext):
    f = tdconv.FactorizedConv2d(4, 6, 3, method="cp", rank=2, implementation="fused")
    with pytest.raises(ValueError, match="expects 4 input channels"):
        f(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="cannot run this input: the factors are torch.float32 but the input is "
                                         "torch.float64"):
        f(torch.ones(1, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"x has 3 channels but first expects 4"):
        torch.ops.tdconv.cp_conv2d(torch.randn(1, 3, 8, 8), torch.randn(2, 4), torch.randn(2, 3, 3),
                                   torch.randn(6, 2), None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        torch.ops.tdconv.cp_conv2d(torch.randn(1, 4, 2, 2), torch.randn(2, 4), torch.randn(2, 3, 3),
                                   torch.randn(6, 2), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        torch.ops.tdconv.cp_conv2d(torch.ones(1, 4, 4, 4, dtype=torch.int32), torch.randn(2, 4),
                                   torch.randn(2, 3, 3), torch.randn(6, 2), None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"tucker_conv2d: rank mismatch.*core is \[3, 2, 3, 3\]"):
        torch.ops.tdconv.tucker_conv2d(torch.randn(1, 4, 8, 8), torch.randn(2, 4), torch.randn(3, 2, 3, 3),
                                       torch.randn(6, 2), None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"tucker_conv2d: core must be \[R_out, R_in, kh, kw\]"):
        torch.ops.tdconv.tucker_conv2d(torch.randn(1, 4, 8, 8), torch.randn(2, 4), torch.randn(2, 3, 3),
                                       torch.randn(6, 2), None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="bias must be \\[6\\]"):
        torch.ops.tdconv.tucker_conv2d(torch.randn(1, 4, 8, 8), torch.randn(2, 4), torch.randn(2, 2, 3, 3),
                                       torch.randn(6, 2), torch.randn(5), [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="stride and dilation must be >= 1"):
        torch.ops.tdconv.tucker_conv2d(torch.randn(1, 4, 8, 8), torch.randn(2, 4), torch.randn(2, 2, 3, 3),
                                       torch.randn(6, 2), None, [0, 1], [1, 1], [1, 1])
    # an asymmetric 'same' padding cannot be fused
    with pytest.raises(ValueError, match="asymmetrically"):
        tdconv.FactorizedConv2d(4, 6, 4, padding="same", implementation="fused")
    # the remembered answer follows the layer: converted to float64, it runs float64 inputs
    f.double()
    assert f(torch.ones(1, 4, 8, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("method", ["cp", "tucker"])
def test_fused_without_grad_skips_autograd_only(require_ext, method):
    # Where no gradient can flow the op is called below autograd: same values, nothing recorded; with
    # gradients on, the autograd formula still runs.
    fused, unfused = _fused_pair(dict(kernel_size=3, padding=1), method, dtype=torch.float64, cin=6, cout=5)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        out = fused(x)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, unfused(x).detach())
    y = fused(x.requires_grad_())
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and fused.first.grad is not None and fused.last.grad is not None


