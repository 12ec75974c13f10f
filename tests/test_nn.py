import copy
import itertools
import os
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

import tdconv
from tdconv import reference as ref

from conftest import planted_cp


def _conv(cin, cout, k, dtype=torch.float64, device="cpu", **kw):
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, k, **kw).to(device=device, dtype=dtype)


def test_planted_cp_kernel_is_exact(require_ext, device):
    conv = _conv(12, 16, 3, device=device, padding=1)
    with torch.no_grad():
        conv.weight.copy_(planted_cp((16, 12, 9), 5, device=device).reshape(16, 12, 3, 3))
    f = tdconv.FactorizedConv2d.from_conv(conv, "cp", 5, init="random", seed=0, n_iter_max=2000, tol=1e-14)
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64, device=device)
    torch.testing.assert_close(f(x), conv(x), atol=1e-6, rtol=1e-6)


def test_planted_cp4_kernel_is_exact(require_ext, device):
    conv = _conv(10, 8, (3, 5), device=device, padding=(1, 2))
    with torch.no_grad():
        conv.weight.copy_(planted_cp((8, 10, 3, 5), 4, device=device))
    f = tdconv.FactorizedConv2d.from_conv(conv, "cp4", 4, init="random", seed=0, n_iter_max=2000, tol=1e-14)
    x = torch.randn(2, 10, 7, 9, dtype=torch.float64, device=device)
    torch.testing.assert_close(f(x), conv(x), atol=1e-6, rtol=1e-6)


def test_tucker_full_rank_is_exact(require_ext, device):
    conv = _conv(6, 9, 3, device=device, stride=2, padding=1)
    f = tdconv.FactorizedConv2d.from_conv(conv, "tucker", (9, 6))
    x = torch.randn(3, 6, 11, 8, dtype=torch.float64, device=device)
    torch.testing.assert_close(f(x), conv(x), atol=1e-10, rtol=1e-10)


CONFIGS = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d, bias=b)
    for k, s, p, d, b in itertools.product([1, 3, 5, (3, 1)], [1, 2], [0, 1, 2, "same", "valid"], [1, 2],
                                           [True, False])
    if not (p == "same" and s != 1)
]


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_layer_equals_its_dense_conv(method):
    # The factorised forward computes exactly the conv with its reconstructed kernel, for every
    # nn.Conv2d argument combination.
    g = torch.Generator().manual_seed(0)
    for cfg in CONFIGS:
        f = tdconv.FactorizedConv2d(5, 7, method=method, rank=3 if method != "tucker" else (4, 3),
                                    dtype=torch.float64, implementation="unfused", **cfg)
        dense = f.to_conv()
        for batch in (0, 1, 3):
            x = torch.randn(batch, 5, 13, 11, dtype=torch.float64, generator=g)
            torch.testing.assert_close(f(x), dense(x), atol=1e-12, rtol=1e-10, msg=f"{method} {cfg} batch {batch}")


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("method", ["cp", "tucker"])
def test_padding_modes(method, padding_mode):
    f = tdconv.FactorizedConv2d(4, 6, 3, stride=2, padding=(1, 2), method=method, rank=0.5,
                                padding_mode=padding_mode, dtype=torch.float64)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(f(x), f.to_conv()(x), atol=1e-12, rtol=1e-10)


def test_layouts(device):
    f = tdconv.FactorizedConv2d(8, 8, 7, padding=3, method="cp", rank=4, dtype=torch.float64, device=device)
    x = torch.randn(2, 8, 11, 13, dtype=torch.float64, device=device)
    y = f(x)
    torch.testing.assert_close(f(x.to(memory_format=torch.channels_last)), y)
    torch.testing.assert_close(f(x.transpose(2, 3).contiguous().transpose(2, 3)), y)


def test_from_conv_keeps_bias_and_arguments(require_ext):
    conv = _conv(16, 32, 3, stride=2, padding=1, dilation=1)
    f = tdconv.FactorizedConv2d.from_conv(conv, method="cp", rank=0.5, seed=0)
    assert f.rank == 16 and f.stride == (2, 2) and f.padding == (1, 1)
    torch.testing.assert_close(f.bias, conv.bias)
    assert "method=cp, rank=16" in repr(f)
    t = tdconv.FactorizedConv2d.from_conv(_conv(128, 64, 3), method="tucker", rank=0.5)
    assert t.rank == (32, 64)
    # The balanced CP factors: each component's three factors have equal norms.
    norms = [f.last.flatten(1).norm(dim=0), f.first.flatten(1).norm(dim=1), f.spatial.flatten(1).norm(dim=1)]
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(norms[0], norms[2], rtol=1e-6, atol=1e-9)


def test_approximation_error_matches_engine(require_ext):
    conv = _conv(32, 32, 3)
    f = tdconv.FactorizedConv2d.from_conv(conv, method="cp", rank=16, seed=0, n_iter_max=50)
    cp = tdconv.cp_als(conv.weight.detach().reshape(32, 32, 9), 16, seed=0, n_iter_max=50)
    err = float((f.kernel() - conv.weight).detach().norm() / conv.weight.detach().norm())
    assert abs(err - cp.rel_error) < 1e-9


def test_training_and_state_dict_round_trip(tmp_path):
    f = tdconv.FactorizedConv2d(4, 6, 3, padding=1, method="cp4", rank=3)
    x = torch.randn(2, 4, 5, 5)
    f(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f.parameters())
    torch.save(f.state_dict(), tmp_path / "f.pt")
    g = tdconv.FactorizedConv2d(4, 6, 3, padding=1, method="cp4", rank=3)
    g.load_state_dict(torch.load(tmp_path / "f.pt", weights_only=True))
    torch.testing.assert_close(g(x), f(x))


def test_gradcheck():
    f = tdconv.FactorizedConv2d(3, 4, 3, stride=2, padding=1, method="tucker", rank=(2, 2), dtype=torch.float64)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: torch.func.functional_call(
        f, dict(zip([n for n, _ in f.named_parameters()], p)), (x,)), (x, *f.parameters()))


def test_init_variance_like_conv2d():
    torch.manual_seed(0)
    f = tdconv.FactorizedConv2d(64, 64, 3, method="cp", rank=32)
    ratio = f.kernel().var().item() / nn.Conv2d(64, 64, 3).weight.var().item()
    assert 0.5 < ratio < 2.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="svd"), "method must be one of"),
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=1.5), r"fraction of the channels must be in \(0, 1\]"),
    (dict(method="tucker", rank=(9, 2)), "out of range"),
    (dict(padding="full"), "padding must be"),
    (dict(padding="same", stride=2), "not supported for strided"),
    (dict(padding_mode="mirror"), "padding_mode must be one of"),
    (dict(padding_mode="reflect", implementation="fused"), "zeros only"),
    (dict(implementation="magic"), "implementation must be one of"),
    (dict(stride=0), "stride must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tdconv.FactorizedConv2d(4, 6, 3, **kwargs)


def test_bad_inputs():
    f = tdconv.FactorizedConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="expects 4 input channels, got 5"):
        f(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="4-D input"):
        f(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="grouped convolutions are not supported"):
        tdconv.FactorizedConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        tdconv.FactorizedConv2d.from_conv(nn.Linear(3, 4))


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
    if method == "tucker" and device.type != "cpu":
        pytest.skip("tucker_conv2d has no CUDA kernel yet")


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_fused_equals_unfused(require_ext, device, method):
    _skip_without_kernel(method, device)
    g = torch.Generator().manual_seed(0)
    for cfg in FUSED_CONFIGS:
        fused, unfused = _fused_pair(cfg, method, device=device)
        for batch in (0, 1, 7):
            x = torch.randn(batch, 5, 15, 17, dtype=torch.float64, generator=g).to(device)
            out = fused(x)
            assert out.is_contiguous(memory_format=torch.channels_last) or out.numel() == 0
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
        if method == "tucker" and device.type != "cpu":
            continue
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
    chain_err = (unfused.to(torch.float32)(x.float()).double() - exact).abs().max().item() / exact.abs().max().item()
    assert err < tol and (dtype != torch.float32 or err <= 10 * chain_err + 1e-7)


def test_auto_times_both_once_and_keeps_the_faster(require_ext, monkeypatch):
    from tdconv import nn as tnn
    tdconv.set_autotune(True)
    layer = tdconv.FactorizedConv2d(8, 8, 3, padding=1, method="cp", rank=4)
    x = torch.randn(2, 8, 6, 6)
    calls = []
    monkeypatch.setattr(tnn.FactorizedConv2d, "_fused_is_faster", lambda self, x: calls.append(1) or False)
    with torch.no_grad():  # inference: auto chooses by timing
        expected = layer._unfused(x)
        torch.testing.assert_close(layer(x), expected)  # timed: the chain "won"
        layer(x)
        assert len(calls) == 1  # cached per configuration
        layer(torch.randn(3, 8, 6, 6))
        assert len(calls) == 2  # a new input shape is timed again
        fused_calls = []
        monkeypatch.setattr(tnn.FactorizedConv2d, "_fused", lambda self, x: fused_calls.append(1) or expected)
        layer(x)
        assert not fused_calls
        tdconv.set_autotune(False)  # off: the fused op whenever it can run
        try:
            layer(x)
            assert fused_calls == [1]
        finally:
            tdconv.set_autotune(True)
    # Under autograd auto takes the chain without timing (the fused op's backward recomputes it).
    layer(torch.randn(4, 8, 6, 6)).sum().backward()
    assert len(calls) == 2 and fused_calls == [1] and layer.first.grad is not None
    with pytest.raises(TypeError, match="enabled must be a bool"):
        tdconv.set_autotune(1)


@pytest.mark.parametrize("fused_s,keeps_fused", [(1.05, True), (1.0, True), (0.5, True), (1.2, False)])
def test_auto_needs_a_margin_to_leave_the_fused_op(require_ext, monkeypatch, fused_s, keeps_fused):
    # On a clock that the two implementations advance by fixed amounts (the chain: 1 s): the chain is
    # chosen only when it is faster by more than AUTOTUNE_MARGIN.
    import types
    from tdconv import nn as tnn
    clock = [0.0]
    monkeypatch.setattr(tnn, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(tnn.FactorizedConv2d, "_fused", lambda self, x: clock.__setitem__(0, clock[0] + fused_s))
    monkeypatch.setattr(tnn.FactorizedConv2d, "_unfused", lambda self, x: clock.__setitem__(0, clock[0] + 1.0))
    layer = tdconv.FactorizedConv2d(8, 8, 3, padding=1, method="cp", rank=4)
    assert tnn.AUTOTUNE_MARGIN == 1.1
    assert layer._fused_is_faster(torch.randn(2, 8, 6, 6)) is keeps_fused


def test_autotune_timing_runs(require_ext):
    layer = tdconv.FactorizedConv2d(8, 8, 3, padding=1, method="tucker", rank=4)
    assert layer._fused_is_faster(torch.randn(2, 8, 6, 6)) in (True, False)


def test_auto_skips_unvalidated_kernels(require_ext, monkeypatch):
    # A kernel that has not run on hardware is used only when asked for explicitly.
    monkeypatch.setattr(tdconv.ops, "UNVALIDATED_KERNELS", {("cp_conv2d", "cpu")})
    layer = tdconv.FactorizedConv2d(4, 6, 3, padding=1, method="cp", rank=2)
    x = torch.randn(1, 4, 5, 5)
    assert any("not been validated" in r for r in layer.fused_unsupported_reasons(x))
    layer.implementation = "fused"
    assert layer.fused_unsupported_reasons(x) == []


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


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_fused_under_torch_compile_and_export(require_ext, method):
    torch.manual_seed(0)
    model = nn.Sequential(tdconv.FactorizedConv2d(8, 16, 3, padding=1, method=method, rank=4), nn.ReLU(),
                          tdconv.FactorizedConv2d(16, 8, 3, stride=2, padding=1, method=method, rank=4))
    x = torch.randn(2, 8, 9, 9)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), eager)
    # training through the fused op under torch.compile gives the eager gradients
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


# ------------------------------------------------------------------- skipping taps that only read padding
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("k, s, p, d", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (7, 2, 3, 1),
                                        (3, 3, 2, 1), (1, 1, 0, 1), (3, 1, 0, 1)])
def test_live_tap_conv_equals_conv(n, k, s, p, d):
    from tdconv.nn import LiveTapConv2d
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, k, s, p, d, bias=True).double()
    if (n + 2 * p - d * (k - 1) - 1) // s + 1 <= 0:
        pytest.skip("empty output")
    live = copy.deepcopy(conv)
    live.__class__ = LiveTapConv2d
    x = torch.randn(2, 4, n, n + 1, dtype=torch.float64, requires_grad=True)
    y, y_live = conv(x), live(x)
    torch.testing.assert_close(y_live, y)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    grads_live = torch.autograd.grad(y_live, (x, live.weight, live.bias), g)
    for a, b in zip(grads_live, grads):
        torch.testing.assert_close(a, b)


def test_skip_padding_taps_on_a_model():
    import torchvision
    from tdconv.compress import count_complexity
    from tdconv.nn import _live_window
    assert _live_window(1, 3, 1, 1, 1) == (1, 1, 0)  # 3x3 on a 1x1 map: the centre tap, no padding
    assert _live_window(2, 3, 2, 1, 1) == (1, 2, 0)  # 3x3 stride 2 on a 2x2 map: taps 1 and 2
    assert _live_window(8, 3, 1, 1, 1) is None
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    small, _ = tdconv.compress(model, "tucker", 0.5, layers="seed", progress=False, n_iter_max=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = small(x)
        counts = count_complexity(small)
        keys = list(small.state_dict())
        tdconv.skip_padding_taps(small)
        assert type(small.layer4[0].conv1) is tdconv.LiveTapConv2d and small.layer4[1].conv2.skip_padding_taps
        torch.testing.assert_close(small(x), before, rtol=1e-4, atol=1e-4)
        assert count_complexity(small) == counts and list(small.state_dict()) == keys
        tdconv.skip_padding_taps(small, False)
        assert type(small.layer4[0].conv1) is torch.nn.Conv2d and not small.layer4[1].conv2.skip_padding_taps
