"""Every layer kind a CNN is made of: 1x1 convs and linear layers by truncated SVD, grouped convs per group,
the per-kind choice of method, budgets over every kind, and models of many families from torchvision and
timm."""
import math

import pytest
import torch
from torch import nn

import tdconv
from tdconv.compress import AUTO_METHODS, count_complexity, layer_kind
from tdconv.decomposition import decompose_kernel, truncated_svd


def _close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("conv", [
    nn.Conv2d(12, 20, 1),
    nn.Conv2d(12, 20, 1, stride=2, bias=False),
    nn.Conv2d(12, 20, 1, padding=1, padding_mode="replicate"),
    nn.Conv2d(12, 8, 1, groups=4),
], ids=["plain", "strided", "padded-replicate", "grouped"])
def test_svd_conv_at_full_rank_is_the_conv(conv):
    torch.manual_seed(0)
    full = conv.groups * min(conv.in_channels, conv.out_channels) // conv.groups
    f = tdconv.FactorizedConv2d.from_conv(conv, "svd", full)
    assert f.rank == full and f.spatial is None
    x = torch.randn(3, 12, 9, 7)
    for mode in (True, False):  # (an SVD layer runs its chain in both)
        f.train(mode)
        _close(f(x), conv(x))
    _close(f.kernel(), conv.weight)
    _close(f.to_conv()(x), conv(x))
    _close(f.to_chain()(x), conv(x))
    assert f.num_params() == sum(p.numel() for p in f.parameters())


def test_svd_below_full_rank_is_the_eckart_young_optimum():
    torch.manual_seed(0)
    w = torch.randn(30, 18, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in (1, 5, 17):
        svd = truncated_svd(w, r)
        approx = svd.factors[0] @ torch.diag(svd.weights) @ svd.factors[1].T
        expected = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
        assert abs(float((approx - w).norm() / w.norm()) - expected) < 1e-12
        assert abs(svd.rel_error - expected) < 1e-12
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 18\]"):
        truncated_svd(w, 19)


def test_svd_factors_are_balanced():
    """Each singular value is split equally over the two factors (SGD on them is well conditioned)."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    f = tdconv.FactorizedLinear.from_linear(lin, 10)
    _close(f.first.norm(dim=1), f.last.norm(dim=0), 1e-5)


def test_linear_at_full_rank_is_the_linear_layer():
    torch.manual_seed(0)
    lin = nn.Linear(16, 24)
    f = tdconv.FactorizedLinear.from_linear(lin, 16)
    for x in (torch.randn(5, 16), torch.randn(2, 3, 4, 16)):  # any leading dimensions, as nn.Linear
        _close(f(x), lin(x))
        _close(f.to_linear()(x), lin(x))
        _close(f.to_chain()(x), lin(x))
    _close(f.weight_matrix(), lin.weight)
    assert f.num_params() == sum(p.numel() for p in f.parameters()) == 16 * 16 + 16 * 24 + 24
    assert repr(f) == "FactorizedLinear(in_features=16, out_features=24, rank=16)"


@pytest.mark.parametrize("method,rank", [("tucker", (24, 16)), ("cp", 4 * 8 * 4 * 9 // 4), ("cp4", 4 * 64)])
def test_grouped_conv_at_full_rank_is_the_conv(require_ext, method, rank):
    """Grouped Tucker-2 at full ranks, and grouped CP at a rank past every group's exact CP rank, equal
    the grouped conv (its block-diagonal factors run as grouped 1x1 / grouped core convs)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, groups=4)
    f = tdconv.FactorizedConv2d.from_conv(conv, method, rank, n_iter_max=200, seed=0)
    assert f.groups == 4 and f.first.shape[1] == 4
    x = torch.randn(2, 16, 8, 8)
    tol = 1e-4 if method == "tucker" else 2e-3
    _close(f(x), conv(x), tol)
    _close(f.kernel(), conv.weight, tol)
    _close(f.to_conv()(x), conv(x), tol)
    _close(f.to_chain()(x), conv(x), tol)
    assert f.num_params() == sum(p.numel() for p in f.parameters())


def test_grouped_factors_are_each_groups_own_decomposition(require_ext):
    """Group g's slices of the factors are the decomposition of group g's block of the kernel alone."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, groups=2, bias=False)
    f = tdconv.FactorizedConv2d.from_conv(conv, "tucker", (6, 4))
    for g, block in enumerate(conv.weight.detach().chunk(2, 0)):
        alone = tdconv.FactorizedConv2d.from_conv(nn.Conv2d(4, 6, 3, bias=False), "tucker", (3, 2))
        alone.load_decomposition(decompose_kernel(block, "tucker", (3, 2)))
        _close(f.kernel().chunk(2, 0)[g], alone.kernel(), 1e-5)
    parts = decompose_kernel(conv.weight.detach(), "tucker", (6, 4), groups=2)
    assert isinstance(parts, list) and len(parts) == 2 and tuple(parts[0].ranks) == (3, 2)


def test_gradcheck_of_the_new_layers():
    torch.manual_seed(0)
    layers = [tdconv.FactorizedConv2d(4, 6, 3, padding=1, groups=2, method="tucker", rank=(4, 2)),
              tdconv.FactorizedConv2d(4, 6, 1, stride=2, method="svd", rank=3),
              tdconv.FactorizedConv2d(4, 6, 3, groups=2, method="cp", rank=4)]
    for layer in layers:
        layer = layer.double().train()
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *layer.parameters()))
    lin = tdconv.FactorizedLinear(5, 4, 3).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: lin(x), (x, *lin.parameters()))


# --------------------------------------------------------------------------------------------- bad input
def test_bad_arguments_of_the_new_layers():
    with pytest.raises(ValueError, match="rank 9 out of range: an SVD rank is at most the smaller channel count 8"):
        tdconv.FactorizedConv2d(8, 12, 1, method="svd", rank=9)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        tdconv.FactorizedConv2d(8, 12, 3, groups=3)
    with pytest.raises(ValueError, match=r"rank \(R_out\) 6 must be a multiple of groups=4"):
        tdconv.FactorizedConv2d(8, 12, 3, groups=4, method="tucker", rank=(6, 4))
    with pytest.raises(ValueError, match="rank 2 out of range"):
        tdconv.FactorizedLinear(8, 1, rank=2)
    assert tdconv.FactorizedLinear(8, 1, rank=0.5).rank == 1
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        tdconv.FactorizedLinear(0, 4)
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 8\]"):
        tdconv.FactorizedLinear(8, 4, 2)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="depthwise convolution"):
        tdconv.FactorizedConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=8), "tucker")
    with pytest.raises(ValueError, match="method='svd' factorises 1x1 kernels"):
        decompose_kernel(torch.randn(4, 4, 3, 3), "svd", 2)
    with pytest.raises(ValueError, match="must be a multiple of groups=2"):
        decompose_kernel(torch.randn(4, 2, 3, 3), "cp", 3, groups=2)
    with pytest.raises(TypeError, match="nn.Linear"):
        tdconv.FactorizedLinear.from_linear(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="fused ops compute ungrouped layers"):
        tdconv.FactorizedConv2d(8, 12, 3, groups=2, implementation="fused")
    with pytest.raises(ValueError, match="two 1x1 convolutions"):
        tdconv.FactorizedConv2d(8, 12, 1, method="svd", implementation="fused")


def test_compress_bad_input_of_the_new_kinds():
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(16 * 36, 10))
    with pytest.raises(ValueError, match=r"method maps unknown layer kinds \['dense'\]"):
        tdconv.compress(net, {"dense": "svd"}, input_size=(8, 6, 6))
    with pytest.raises(ValueError, match=r"method\['linear'\] must be one of \('svd',\)"):
        tdconv.compress(net, {"linear": "tucker"}, input_size=(8, 6, 6))
    with pytest.raises(ValueError, match=r"method\('0'\) returned 'svd' for a conv layer"):
        tdconv.compress(net, lambda m, name: "svd", input_size=(8, 6, 6))
    with pytest.raises(TypeError, match="method must be a str, a dict"):
        tdconv.compress(net, 3, input_size=(8, 6, 6))
    with pytest.raises(ValueError, match=r"rank for layer '1' \(svd, 16x16\).*rank 17 out of range"):
        tdconv.compress(net, "auto", 4, overrides={"1": 17}, input_size=(8, 6, 6))
    with pytest.raises(ValueError, match=r"rank for layer '3' \(svd, 10x576\).*rank must be a positive integer"):
        tdconv.compress(net, "auto", (4, 4), layers=["3"], input_size=(8, 6, 6))


def test_linear_layer_with_one_output_stays_dense_with_the_reason():
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    small, report = tdconv.compress(net, "auto", 0.25, input_size=(1, 1, 64))
    assert isinstance(small[0], tdconv.FactorizedLinear) and isinstance(small[2], nn.Linear)
    reason = dict(report.skipped)["2"]
    assert "would not be cheaper" in reason and "parameters 34 >= 33" in reason
    x = torch.randn(5, 64)
    assert small(x).shape == (5, 1)


# --------------------------------------------------------------------------------------------- choosing
class _Mixed(nn.Module):
    """A spatial conv, a grouped conv, a depthwise conv, a square and an expanding 1x1 conv, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.square = nn.Conv2d(32, 32, 1)
        self.expand = nn.Conv2d(32, 128, 1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        x = self.expand(self.square(self.dw(self.grouped(x))))
        return self.fc(x.mean((2, 3)))


def test_layer_kinds():
    m = _Mixed()
    kinds = {n: layer_kind(c) for n, c in m.named_children()}
    assert kinds == {"stem": "conv", "conv": "conv", "grouped": "grouped_conv", "dw": "depthwise",
                     "square": "pointwise", "expand": "pointwise", "fc": "linear"}
    assert AUTO_METHODS == {"conv": "tucker", "grouped_conv": "tucker", "pointwise": "svd", "linear": "svd"}


def test_auto_factorises_every_kind_that_pays(require_ext):
    torch.manual_seed(0)
    model = _Mixed().eval()
    small, report = tdconv.compress(model, "auto", 0.5, input_size=(3, 8, 8))
    got = {r.name: (r.method, r.rank) for r in report.layers}
    assert got == {"conv": ("tucker", [16, 8]), "grouped": ("tucker", [16, 16]), "expand": ("svd", 16),
                   "fc": ("svd", 5)}
    assert isinstance(small.fc, tdconv.FactorizedLinear) and small.grouped.groups == 4
    skipped = dict(report.skipped)
    assert "input conv" in skipped["stem"] and "depthwise" in skipped["dw"]
    # rank 16 of a 32x32 1x1 conv costs 16 * 64 = 1024 + 32 parameters: as many as the dense layer
    assert "would not be cheaper (parameters 1056 >= 1056" in skipped["square"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    assert (report.macs_after, report.params_after) == count_complexity(small, (3, 8, 8))
    assert report.macs_before - report.macs_after == sum(r.macs_before - r.macs_after for r in report.layers)
    assert report.params_before - report.params_after == sum(r.params_before - r.params_after for r in report.layers)


def test_method_as_a_dict_and_as_a_callable(require_ext):
    torch.manual_seed(0)
    model = _Mixed().eval()
    _, report = tdconv.compress(model, {"linear": "svd", "conv": "cp"}, 0.5, input_size=(3, 8, 8), n_iter_max=2)
    assert {r.name: r.method for r in report.layers} == {"conv": "cp", "fc": "svd"}
    assert "gives no method for this grouped_conv layer" in dict(report.skipped)["grouped"]
    _, report = tdconv.compress(model, lambda m, name: "auto" if name != "conv" else None, 0.5, input_size=(3, 8, 8))
    assert {r.name for r in report.layers} == {"grouped", "expand", "fc"} and report.method == "per-layer"
    # a spatial-conv method leaves 1x1 convs and linear layers dense, saying how to factorise them
    _, report = tdconv.compress(model, "tucker", 0.5, input_size=(3, 8, 8))
    assert {r.name for r in report.layers} == {"conv", "grouped"}
    assert "method='auto'" in dict(report.skipped)["fc"]


def test_uncalled_layers_and_own_forward_subclasses_stay_dense(require_ext):
    class Standardised(nn.Conv2d):  # a weight-standardised conv: another function than its kernel's
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
            return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 16, 3, padding=1)
            self.b = Standardised(16, 16, 3, padding=1)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.unused = nn.Linear(16, 16)

        def forward(self, x):
            x = self.b(self.a(x)).flatten(2).transpose(1, 2)
            return self.attn(x, x, x)[0]

    net = Net().eval()
    small, report = tdconv.compress(net, "auto", 0.5, input_size=(8, 4, 4))
    skipped = dict(report.skipped)
    assert "own forward" in skipped["b"] and "MultiheadAttention" in skipped["attn.out_proj"]
    assert "not called" in skipped["unused"]
    assert [r.name for r in report.layers] == ["a"]
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        assert small(x).shape == net(x).shape


# --------------------------------------------------------------------------------------------- counting, saving
def test_ptflops_and_flop_counter_count_the_layers_as_their_standard_chains(require_ext):
    """The new layers are counted (ptflops with tdconv.ptflops_hooks(); FlopCounterMode as it is) exactly
    as the standard modules they are equivalent to (tdconv.to_standard)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    small, _ = tdconv.compress(_Mixed().eval(), "auto", 0.5, input_size=(3, 8, 8))
    standard = tdconv.to_standard(small)
    assert not any(isinstance(m, (tdconv.FactorizedConv2d, tdconv.FactorizedLinear)) for m in standard.modules())
    assert count_complexity(small, (3, 8, 8)) == count_complexity(standard, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    counts = []
    for m in (small, standard):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x)
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] > 0
    # a linear layer's MACs per row, as ptflops counts two nn.Linear (bias included)
    f = small.fc
    assert f.macs() == 128 * 5 + 5 * 10 + 10 and f.macs(rows=7) == 7 * f.macs()


def test_save_load_round_trip_of_every_kind(require_ext, tmp_path):
    torch.manual_seed(0)
    model = _Mixed().eval()
    small, _ = tdconv.compress(model, "auto", 0.5, input_size=(3, 8, 8))
    tdconv.save(small, tmp_path / "m.pt")
    back = tdconv.load(tmp_path / "m.pt", _Mixed()).eval()
    assert isinstance(back.fc, tdconv.FactorizedLinear) and back.grouped.groups == 4
    assert back.expand.method == "svd"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))


# --------------------------------------------------------------------------------------------- data-aware fits
def test_data_aware_fits_of_svd_layers(require_ext):
    """With calibration data, 1x1 convs and linear layers get the data-aware SVD fit where it is better
    on the data than the kernel's truncated SVD, and never a worse one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 16, 32))
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    # Inputs with a few dominant directions: where the data lives matters for the fit.
    basis = torch.randn(4, 16)
    x = (torch.randn(256, 4, 4, 4).permute(0, 2, 3, 1) @ basis).permute(0, 3, 1, 2) + 0.05 * torch.randn(256, 16, 4, 4)
    small, report = tdconv.compress(net, "auto", 0.25, calibration=x, input_size=(16, 4, 4))
    rows = {r.name: r for r in report.layers}
    assert set(rows) == {"0", "4"}
    for r in rows.values():  # both get the data fit, much better on the data (and on the held-out part)
        assert r.fit == "data" and r.output_error < 0.8 * r.kernel_fit_output_error
        assert r.held_out_error < 0.8 * r.kernel_fit_held_out_error


def test_grouped_layers_with_calibration_get_the_kernel_fit_with_the_reason(require_ext):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=2)).eval()
    _, report = tdconv.compress(net, "auto", 0.5, calibration=torch.randn(64, 8, 6, 6), input_size=(8, 6, 6))
    rows = {r.name: r for r in report.layers}
    assert "grouped convolution" in rows["1"].fit and rows["0"].output_error is not None


# --------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("metric,target", [("macs", 0.5), ("params", 0.3)])
def test_budgets_over_every_kind_land_within_two_percent(require_ext, metric, target):
    torch.manual_seed(0)
    model = _Mixed().eval()
    small, report = tdconv.compress(model, "auto", input_size=(3, 8, 8), **{f"target_{metric}": target})
    got = (report.macs_after / report.macs_before if metric == "macs" else
           report.params_after / report.params_before)
    assert 0.98 * target <= got <= target
    assert {r.method for r in report.layers} == {"tucker", "svd"}  # the budget spans the kinds


# --------------------------------------------------------------------------------------------- many architectures
ARCHITECTURES = [
    ("residual", "resnet18"),
    ("bottleneck", "resnet50"),
    ("VGG-style", "vgg11_bn"),
    ("inverted residual", "mobilenet_v2"),
    ("squeeze-excitation", "timm:efficientnet_b0"),
    ("grouped (RegNet)", "regnet_x_400mf"),
    ("ConvNeXt-style", "timm:convnext_atto"),
    ("dense connections", "densenet121"),
]


@pytest.mark.parametrize("family,name", ARCHITECTURES, ids=[n for _, n in ARCHITECTURES])
def test_architectures_compress_to_the_budget(require_ext, family, name):
    """Eight families, built by name as the command line builds them (torchvision, or timm): the
    compressed model runs, its outputs have the dense model's shape, and its MACs land within 2 % under
    the budget with fewer parameters; the layers left dense say why."""
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    from tdconv.apps.models import build_model
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    small, report = tdconv.compress(model, "auto", target_macs=0.5, input_size=(3, 64, 64), n_iter_max=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert small(x).shape == model(x).shape == (2, 10)
    frac = report.macs_after / report.macs_before
    assert 0.49 <= frac <= 0.5, frac
    assert report.params_after < report.params_before
    assert (report.macs_after, report.params_after) == count_complexity(small, (3, 64, 64))
    assert report.layers, report.skipped
    reasons = ("input conv", "depthwise", "left dense by the budget", "not called", "would not be cheaper")
    for n, why in report.skipped:  # every layer left dense says why
        assert any(r in why for r in reasons), (n, why)
    assert all(math.isfinite(r.rel_error) for r in report.layers)


@pytest.mark.parametrize("name", ["mobilenet_v2", "regnet_x_400mf", "timm:convnext_atto"])
def test_auto_at_a_fixed_rank_factorises_every_kind_present(require_ext, name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    from tdconv.apps.models import build_model
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    small, report = tdconv.compress(model, "auto", 0.25, input_size=(3, 64, 64), n_iter_max=1)
    kinds = {layer_kind(m) for n, m in model.named_modules() if n not in dict(report.skipped)} - {None, "depthwise"}
    factorised = {layer_kind(model.get_submodule(r.name)) for r in report.layers}
    assert factorised == kinds and len(kinds) >= 2
    grouped = [r.name for r in report.layers if layer_kind(model.get_submodule(r.name)) == "grouped_conv"]
    assert all(small.get_submodule(n).groups == model.get_submodule(n).groups > 1 for n in grouped)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert small(x).shape == model(x).shape


def test_truncated_svd_of_a_large_matrix_by_its_gram_matrix(monkeypatch):
    """The Gram-matrix path of large layers gives the SVD path's approximation."""
    import tdconv.decomposition.kernels as kernels
    torch.manual_seed(0)
    w = torch.randn(40, 90) @ torch.diag(torch.logspace(0, -3, 90))
    exact = truncated_svd(w, 12)
    monkeypatch.setattr(kernels, "GRAM_SVD_MIN", 8)
    for m in (w, w.T):
        gram = truncated_svd(m, 12)
        a = gram.factors[0] @ torch.diag(gram.weights) @ gram.factors[1].T
        b = exact.factors[0] @ torch.diag(exact.weights) @ exact.factors[1].T
        _close(a, b if m is w else b.T, 1e-5)
        _close(gram.weights, exact.weights, 1e-5)
        assert abs(gram.rel_error - exact.rel_error) < 1e-6


# --------------------------------------------------------------------------------------------- command line
def test_cli_builds_timm_models_and_loads_their_weights(require_ext, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from tdconv.cli import main
    torch.manual_seed(0)
    dense = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    weights, out = tmp_path / "dense.pt", tmp_path / "small.pt"
    torch.save(dense.state_dict(), weights)
    assert main(["compress", "--model", "timm:convnext_atto", "--num-classes", "10", "--weights", str(weights),
                 "--target-macs", "0.5", "--input-size", "3,64,64", "--n-iter-max", "1", "--out", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "method=auto" in text and "MACs (3x64x64, ptflops)" in text
    assert main(["report", str(out)]) == 0
    assert "rebuilt timm:convnext_atto from the file" in capsys.readouterr().out
    # the weights were loaded: what stays dense is the file's, and the factorised layers reconstruct it
    small = tdconv.load(out, timm.create_model("convnext_atto", pretrained=False, num_classes=10))
    torch.testing.assert_close(small.stem[0].weight, dense.stem[0].weight, rtol=0, atol=0)
    factorised = [(n, m) for n, m in small.named_modules()
                  if isinstance(m, (tdconv.FactorizedLinear, tdconv.FactorizedConv2d))]
    assert factorised
    name, layer = factorised[-1]
    w = dense.get_submodule(name).weight.detach()
    assert float((layer.kernel() - w).norm() / w.norm()) < 0.99
    with pytest.raises(SystemExit, match="is not a timm model"):
        main(["compress", "--model", "timm:no_such_net", "--quiet"])
    with pytest.raises(SystemExit, match="nor, with timm installed, a timm one"):
        main(["compress", "--model", "no_such_net", "--quiet"])


# --------------------------------------------------------------------------------------------- inference, compatibility
def test_optimize_for_inference_folds_into_grouped_svd_and_linear_layers(require_ext):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
    net.eval()
    small, _ = tdconv.compress(net, "auto", 0.5, input_size=(8, 4, 4))
    assert isinstance(small[0], tdconv.FactorizedConv2d) and small[0].groups == 2 and small[3].method == "svd"
    assert isinstance(small[7], tdconv.FactorizedLinear)
    fast, info = tdconv.optimize_for_inference(small, report=True)
    assert info.skipped is None and sorted(info.folded) == ["0", "3"] and sorted(info.fused_relu) == ["0", "3"]
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        _close(fast(x), small(x), 1e-5)
    exported = torch.export.export(fast, (x,))
    _close(exported.module()(x), small(x), 1e-5)


def test_a_layer_pickled_before_groups_existed_still_runs():
    import pickle
    layer = tdconv.FactorizedConv2d(4, 6, 3, padding=1, method="tucker", rank=(3, 2))
    old = pickle.loads(pickle.dumps(layer))
    del old.__dict__["groups"]  # as a layer pickled whole by an earlier version
    old.__dict__.pop("_dispatch_state", None)
    x = torch.randn(1, 4, 5, 5)
    _close(old(x), layer(x))
    assert old.groups == 1 and "groups" not in old.spec()


def test_grouped_1x1_convs_with_calibration_get_the_kernel_fit(require_ext):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 32, 1, groups=4), nn.ReLU()).eval()
    small, report = tdconv.compress(net, "auto", 0.5, input_size=(8, 4, 4), calibration=torch.randn(32, 8, 4, 4))
    rows = {r.name: r for r in report.layers}
    assert "grouped convolution" in rows["1"].fit and small[1].groups == 4
    _, report = tdconv.compress(net, "auto", input_size=(8, 4, 4), calibration=torch.randn(32, 8, 4, 4),
                                target_macs=0.5)
    assert 0.98 * 0.5 <= report.macs_after / report.macs_before <= 0.5


def test_budget_curves_of_grouped_layers_and_matrices():
    from tdconv.geometry import ConvGeometry
    from tdconv.ranks import _error, _path, allocate_budget, layer_cost, mode_tails
    torch.manual_seed(0)
    # A grouped kernel: the tails are the groups' own, summed; the error at full per-group ranks is 0.
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    t0, t1 = mode_tails(w, groups=4)
    assert len(t0) == 3 and len(t1) == 3 and abs(float(t0[0]) - 1) < 1e-12 and float(t0[2]) < 1e-12
    assert _error((t0, t1), "tucker", (8, 8), 4) < 1e-6 and _error((t0, t1), "tucker", None, 4) == 0
    # A matrix: both tails from one spectrum; the SVD error is exactly the energy beyond the rank.
    m = torch.randn(6, 10, dtype=torch.float64)
    t0, t1 = mode_tails(m)
    s = torch.linalg.svdvals(m)
    assert len(t0) == 7 and len(t1) == 11
    torch.testing.assert_close(t1[:7], t0)
    assert abs(_error((t0, t1), "svd", 2) - float(s[2:].norm() / s.norm())) < 1e-12
    # A path ends with the dense layer (None), after the last rank cheaper than it in both metrics.
    g = ConvGeometry(32, 32, (1, 1))
    layer = {"geometry": g, "hw": (4, 4), "method": "svd", "dense_cost": layer_cost(g, "dense", None, "macs", (4, 4)),
             "other_metric": "params"}
    path = _path(layer, lambda ly, r: ly["dense_cost"] if r is None else layer_cost(g, "svd", r, "macs", (4, 4)), 0.0)
    assert path[-1] is None and path[-2] == 15 and path[0] == 1   # rank 16 costs as much as the dense layer
    # With room for everything, every layer is left dense.
    w = torch.randn(32, 32, 1, 1)
    got = allocate_budget([dict(layer, name="a", tails=mode_tails(w))], "svd", layer["dense_cost"], "macs")
    assert got == {"a": None}
