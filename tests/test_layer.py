import itertools

import pytest
import torch
from torch import nn

import tdconv

from conftest import planted_cp


def _conv(cin, cout, k, dtype=torch.float64, device="cpu", **kw):
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, k, **kw).to(device=device, dtype=dtype)


def _run(layer, x, implementation):
    """The layer's output with ``implementation``, under no_grad: with gradients on, "auto" takes the chain
    and a test would only exercise PyTorch's own convolutions."""
    layer.implementation = implementation
    with torch.no_grad():
        return layer(x)


IMPLEMENTATIONS = ["unfused", "fused", "auto"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_planted_cp_kernel_is_exact(require_ext, device, implementation):
    conv = _conv(12, 16, 3, device=device, padding=1)
    with torch.no_grad():
        conv.weight.copy_(planted_cp((16, 12, 9), 5, device=device).reshape(16, 12, 3, 3))
    f = tdconv.FactorizedConv2d.from_conv(conv, "cp", 5, init="random", seed=0, n_iter_max=2000, tol=1e-14)
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64, device=device)
    torch.testing.assert_close(_run(f, x, implementation), conv(x).detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_planted_cp4_kernel_is_exact(require_ext, device, implementation):
    conv = _conv(10, 8, (3, 5), device=device, padding=(1, 2))
    with torch.no_grad():
        conv.weight.copy_(planted_cp((8, 10, 3, 5), 4, device=device))
    f = tdconv.FactorizedConv2d.from_conv(conv, "cp4", 4, init="random", seed=0, n_iter_max=2000, tol=1e-14)
    x = torch.randn(2, 10, 7, 9, dtype=torch.float64, device=device)
    torch.testing.assert_close(_run(f, x, implementation), conv(x).detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tucker_full_rank_is_exact(require_ext, device, implementation):
    conv = _conv(6, 9, 3, device=device, stride=2, padding=1)
    f = tdconv.FactorizedConv2d.from_conv(conv, "tucker", (9, 6))
    x = torch.randn(3, 6, 11, 8, dtype=torch.float64, device=device)
    torch.testing.assert_close(_run(f, x, implementation), conv(x).detach(), atol=1e-10, rtol=1e-10)


CONFIGS = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d, bias=b)
    for k, s, p, d, b in itertools.product([1, 3, 5, (3, 1)], [1, 2], [0, 1, 2, "same", "valid"], [1, 2],
                                           [True, False])
    if not (p == "same" and s != 1)
]


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_layer_equals_its_dense_conv_and_its_chain(method):
    # The factorised forward computes exactly the conv with its reconstructed kernel, for every
    # nn.Conv2d argument combination; to_chain() is the same function made of standard modules.
    g = torch.Generator().manual_seed(0)
    for cfg in CONFIGS:
        f = tdconv.FactorizedConv2d(5, 7, method=method, rank=3 if method != "tucker" else (4, 3),
                                    dtype=torch.float64, implementation="unfused", **cfg)
        dense, chain = f.to_conv(), f.to_chain()
        assert all(type(m) in (nn.Conv2d, nn.ZeroPad2d) for m in chain)
        for batch in (0, 1, 3):
            x = torch.randn(batch, 5, 13, 11, dtype=torch.float64, generator=g)
            with torch.no_grad():
                y = f(x)
                torch.testing.assert_close(y, dense(x), atol=1e-12, rtol=1e-10, msg=f"{method} {cfg} batch {batch}")
                torch.testing.assert_close(chain(x), y, atol=1e-12, rtol=1e-10, msg=f"{method} {cfg} chain")


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_padding_modes(method, padding_mode):
    f = tdconv.FactorizedConv2d(4, 6, 3, stride=2, padding=(1, 2), method=method, rank=0.5,
                                padding_mode=padding_mode, dtype=torch.float64)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(f(x), f.to_conv()(x), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(f.to_chain()(x), f(x), atol=1e-12, rtol=1e-10)


def _layout(t):
    return t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("method", ["cp", "tucker"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_output_layout_is_that_of_nn_conv2d(require_ext, method, implementation):
    # Whatever the implementation (and so whatever auto's stopwatch says), the output has the memory format
    # nn.Conv2d gives the same input: code such as y.view(n, -1) must not work or fail by timing.
    f = tdconv.FactorizedConv2d(8, 6, 3, padding=1, method=method, rank=4, implementation=implementation)
    dense = f.to_conv()
    x = torch.randn(2, 8, 7, 5)
    big = torch.randn(2, 8, 14, 10).to(memory_format=torch.channels_last)
    inputs = [x, x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
              torch.randn(1, 8, 1, 1), torch.randn(3, 8, 4, 4).to(memory_format=torch.channels_last),
              big[:, :, ::2, ::2], x[:, :, 1:, :]]
    with torch.no_grad():
        for xi in inputs:
            y, ref = f(xi), dense(xi)
            assert _layout(y) == _layout(ref), (implementation, xi.shape, xi.stride(), y.stride(), ref.stride())
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
        assert f(x).view(2, -1).shape == (2, 6 * 7 * 5)
        # A model converted to channels_last (its 4-D parameters) computes in channels_last, as nn.Conv2d does.
        f.to(memory_format=torch.channels_last)
        dense.to(memory_format=torch.channels_last)
        assert _layout(f(x)) == _layout(dense(x)) == (False, True)


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


def test_from_conv_options_every_method_accepts(require_ext):
    # seed is accepted for every method (Tucker is deterministic and ignores it), as compress passes it.
    conv = _conv(8, 8, 3, padding=1)
    a = tdconv.FactorizedConv2d.from_conv(conv, "tucker", 0.5, seed=0)
    b = tdconv.FactorizedConv2d.from_conv(conv, "tucker", 0.5, seed=7)
    torch.testing.assert_close(a.kernel(), b.kernel())
    # NumPy scalars are ranks like Python's own
    np = pytest.importorskip("numpy")
    assert tdconv.FactorizedConv2d.from_conv(conv, "cp", np.float32(0.5), seed=0).rank == 4
    assert tdconv.FactorizedConv2d.from_conv(conv, "tucker", (np.int64(3), 2)).rank == (3, 2)
    with pytest.raises(TypeError, match="seed must be an integer or None, got float 1.7"):
        tdconv.FactorizedConv2d.from_conv(conv, "cp", 4, seed=1.7)
    with pytest.raises(TypeError, match=r"unexpected decomposition options for method 'tucker': \['init'\]"):
        tdconv.FactorizedConv2d.from_conv(conv, "tucker", 4, init="random")
    with pytest.raises(ValueError, match="meta device: it has shapes but no values"):
        tdconv.FactorizedConv2d.from_conv(nn.Conv2d(8, 8, 3, device="meta"), "cp", 4)


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
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in f.parameters())
    torch.save(f.state_dict(), tmp_path / "f.pt")
    g = tdconv.FactorizedConv2d(4, 6, 3, padding=1, method="cp4", rank=3)
    g.load_state_dict(torch.load(tmp_path / "f.pt", weights_only=True))
    torch.testing.assert_close(g(x), f(x))


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_gradcheck(method):
    f = tdconv.FactorizedConv2d(3, 4, 3, stride=2, padding=1, method=method, rank=(2, 2) if method == "tucker" else 2,
                                dtype=torch.float64, implementation="unfused")
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: torch.func.functional_call(
        f, dict(zip([n for n, _ in f.named_parameters()], p)), (x,)), (x, *f.parameters()))


def test_init_variance_like_conv2d():
    torch.manual_seed(0)
    f = tdconv.FactorizedConv2d(64, 64, 3, method="cp", rank=32)
    ratio = f.kernel().var().item() / nn.Conv2d(64, 64, 3).weight.var().item()
    assert 0.5 < ratio < 2.0


def _ptflops_macs(module, input_hw, channels):
    ptflops = pytest.importorskip("ptflops")
    macs, _ = ptflops.get_model_complexity_info(module, (channels, *input_hw), as_strings=False,
                                                print_per_layer_stat=False, verbose=False, backend="pytorch",
                                                backend_specific_config={"count_functional": False})
    return int(macs)


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_macs_and_params_agree_with_ptflops_on_the_chain(method):
    # macs() is what ptflops counts on the equivalent chain of nn.Conv2d modules, for every padding,
    # stride and dilation (cp4's kh x 1 conv runs on the unpadded width: 274,432 MACs, not 275,968, on
    # a 64->64 rank-32 3x3 layer with padding 1 on an 8x8 map).
    cases = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
             dict(kernel_size=(3, 5), padding=(1, 2), dilation=2), dict(kernel_size=4, padding="same"),
             dict(kernel_size=3, padding="valid", bias=False), dict(kernel_size=3, padding=1, padding_mode="reflect"),
             dict(kernel_size=5, stride=(2, 1), padding=(0, 3))]
    for cfg in cases:
        f = tdconv.FactorizedConv2d(12, 10, method=method, rank=(4, 3) if method == "tucker" else 5, **cfg)
        for hw in ((8, 8), (9, 13)):
            assert f.macs(hw) == _ptflops_macs(f.to_chain(), hw, 12), (method, cfg, hw)
        assert f.num_params() == sum(p.numel() for p in f.parameters()) == sum(
            p.numel() for p in f.to_chain().parameters())
    if method == "cp4":
        f = tdconv.FactorizedConv2d(64, 64, 3, padding=1, method="cp4", rank=32, bias=False)
        assert f.macs((8, 8)) == 274_432


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="svd4"), "method must be one of"),
    (dict(method="svd"), "method='svd' factorises 1x1 convolutions"),
    (dict(groups=3), "groups=3 must divide"),
    (dict(groups=2, rank=3), "must be a multiple of groups=2"),
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
    with pytest.raises(ValueError, match="depthwise convolution"):
        tdconv.FactorizedConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        tdconv.FactorizedConv2d.from_conv(nn.Linear(3, 4))
    assert tdconv.FactorizedConv2d(4, 6, 3, bias=0).bias is None  # any truth value, as nn.Conv2d


def test_load_decomposition_checks_what_it_is_given(require_ext):
    conv = _conv(8, 6, 3, padding=1)
    w = conv.weight.detach()
    cp3 = tdconv.cp_als(w.reshape(6, 8, 9), 4, n_iter_max=3, seed=0)
    tk = tdconv.tucker_hooi(w, (3, 4), modes=(0, 1), n_iter_max=3)
    layer = tdconv.FactorizedConv2d.from_decomposition(conv, "tucker", tk)
    assert layer.rank == (3, 4)
    torch.testing.assert_close(layer.kernel(), tk.to_tensor())
    with pytest.raises(TypeError, match="a cp4 layer is made of a CPTensor, got TuckerTensor"):
        tdconv.FactorizedConv2d.from_decomposition(conv, "cp4", tk)
    with pytest.raises(ValueError, match=r"of shape \(6, 8, 9\), not of this layer's kernel"):
        tdconv.FactorizedConv2d.like(conv, "cp4", 4).load_decomposition(cp3)
    with pytest.raises(ValueError, match=r"bias must be \[6\]"):
        tdconv.FactorizedConv2d.like(conv, "cp", 4).load_decomposition(cp3, torch.zeros(1))
    with pytest.raises(ValueError, match="for a layer without one"):
        tdconv.FactorizedConv2d.like(conv, "cp", 4, bias=False).__class__(8, 6, 3, bias=False, rank=4) \
            .load_decomposition(cp3, torch.zeros(6))


def test_fractions_name_the_channel_count_they_are_closest_to_from_below():
    np = pytest.importorskip("numpy")
    assert tdconv.FactorizedConv2d(10, 10, 3, rank=np.float32(0.7)).rank == 7
    assert tdconv.FactorizedConv2d(100, 100, 3, rank=0.29).rank == 29
    assert tdconv.FactorizedConv2d(100, 100, 3, method="tucker", rank=0.29).rank == (29, 29)
    assert tdconv.FactorizedConv2d(3, 3, 3, rank=0.5).rank == 1
