"""Data-aware compression (``tdconv.compress(..., calibration=X)``): the fits, the sequential driver and
its bad inputs."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tdconv
from tdconv import calibration as cal
from tdconv.geometry import ConvGeometry


class Net(nn.Module):
    """Three 3x3 convs (the first a 3-channel stem), optional BatchNorm after each."""

    def __init__(self, bn=True, width=16):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1, bias=not bn), norm(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1, bias=not bn), norm(width)
        self.c3, self.b3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=not bn), norm(2 * width)
        self.c4, self.b4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=not bn), norm(2 * width)
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.b3(self.c3(x)))
        x = F.relu(self.b4(self.c4(x)))
        return self.fc(x.mean((2, 3)))


def _net(bn=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = Net(bn).to(dtype)
    if bn:  # BatchNorm statistics and scales that are not the identity
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.randn(32, 3, 12, 12, dtype=dtype))
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 2.0)
    return net.eval()


def _inputs(n=96, seed=1, dtype=torch.float32, hw=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g, dtype=dtype)


LAYERS = ["c2", "c3", "c4"]


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# --------------------------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("padding,mode,stride,dilation", [(1, "zeros", 1, 1), (2, "reflect", 2, 1),
                                                          ("same", "zeros", 1, 2), (0, "zeros", 1, 1),
                                                          (1, "circular", 1, 1)])
def test_patches_compute_the_conv(padding, mode, stride, dilation):
    conv = nn.Conv2d(4, 5, (3, 2) if padding != "same" else 2, stride=stride, padding=padding, dilation=dilation,
                     padding_mode=mode).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    y = conv(x)
    p = cal.patches(x, ConvGeometry.of(conv))
    direct = (p @ conv.weight.reshape(5, -1).T + conv.bias).reshape(2, -1, 5)
    assert torch.allclose(direct, y.flatten(2).transpose(1, 2), atol=1e-12)


def test_closed_form_error_matches_the_layers_outputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    layer = tdconv.FactorizedConv2d.from_conv(conv, "tucker", (4, 3)).double()
    x_t = torch.randn(5, 6, 7, 7, dtype=torch.float64)
    x_s = x_t + 0.3 * torch.randn_like(x_t)
    m = cal.Moments(conv.weight, conv.bias, ConvGeometry.of(conv))
    m.add(x_t[:2], x_s[:2])
    m.add(x_t[2:], x_s[2:])
    m.finish("conv")
    d = torch.rand(8, dtype=torch.float64) + 0.5
    k = torch.cat([layer.kernel().reshape(8, -1), layer.bias[:, None]], 1).detach()
    with torch.no_grad():
        expected = float(((conv(x_t) - layer(x_s)) * d[:, None, None]).norm() / (conv(x_t) * d[:, None, None]).norm())
    assert cal.output_error(m, k, d) == pytest.approx(expected, rel=1e-9)


def test_bn_scale_found_only_where_a_batchnorm_follows():
    net = _net(bn=True)
    scales = cal.bn_scale_after(net, LAYERS, _inputs(4))
    bn = net.b3
    assert torch.allclose(scales["c3"], (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double())
    assert cal.bn_scale_after(_net(bn=False), LAYERS, _inputs(4)) == {}


# --------------------------------------------------------------------------------------------- the fits
def test_planted_subspace_is_recovered_exactly_where_the_kernel_fit_cannot():
    """Inputs whose channels occupy a 4-dimensional subspace: Tucker at R_in = 4 computes the layer's
    output exactly from data; the kernel fit at that rank cannot."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 12, 3, padding=1, bias=False).double()
    basis = torch.randn(16, 4, dtype=torch.float64)
    z = torch.randn(64, 4, 6, 6, dtype=torch.float64)
    x = torch.einsum("cr,nrhw->nchw", basis, z)
    model = nn.Sequential(conv)
    small, report = tdconv.compress(model, "tucker", (12, 4), layers=["0"], calibration=x, input_size=(16, 6, 6))
    fresh = torch.einsum("cr,nrhw->nchw", basis, torch.randn(8, 4, 6, 6, dtype=torch.float64))
    assert _rel(small(fresh), conv(fresh)) < 1e-6
    kernel_only, _ = tdconv.compress(model, "tucker", (12, 4), layers=["0"], input_size=(16, 6, 6))
    assert _rel(kernel_only(fresh), conv(fresh)) > 0.1
    layer = report.layers[0]
    assert layer.fit == "data" and layer.output_error < 1e-6 and layer.held_out_error < 1e-6
    assert layer.kernel_fit_output_error > 0.1


def test_taps_that_only_read_padding_get_no_weight():
    """A 3x3 conv on 1x1 maps only uses its centre tap: the data-aware fits put (almost) nothing on
    the others and compute the centre-tap conv closely."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 24, 3, padding=1, bias=False)
    x = torch.randn(400, 24, 1, 1)
    for method, rank in (("cp", 12), ("tucker", (12, 12))):
        small, report = tdconv.compress(nn.Sequential(conv), method, rank, layers=["0"], calibration=x,
                                        input_size=(24, 1, 1), seed=0)
        kernel = small[0].kernel().detach()
        off = kernel.clone()
        off[:, :, 1, 1] = 0
        assert float(off.norm()) < 1e-2 * float(kernel.norm()), method
        assert report.layers[0].output_error < report.layers[0].kernel_fit_output_error


@pytest.mark.parametrize("method", ["cp", "tucker", "cp4"])
@pytest.mark.parametrize("bn", [True, False])
def test_data_fit_never_worse_than_the_kernel_fit(method, bn):
    net = _net(bn=bn)
    rank = (8, 8) if method == "tucker" else 8
    small, report = tdconv.compress(net, method, rank, layers=LAYERS, calibration=_inputs(160), seed=0,
                                    input_size=(3, 12, 12), reestimate_bn=False)
    assert [r.name for r in report.layers] == LAYERS
    for r in report.layers:
        assert r.output_error <= r.kernel_fit_output_error + 1e-9, r
        assert r.held_out_error <= r.kernel_fit_held_out_error * 1.02 + 1e-9, r
    if method != "cp4":
        assert all(r.fit == "data" for r in report.layers)
    x = _inputs(64, seed=5)
    kernel_only, _ = tdconv.compress(net, method, rank, layers=LAYERS, seed=0, input_size=(3, 12, 12))
    with torch.no_grad():
        assert _rel(small(x), net(x)) < _rel(kernel_only(x), net(x))


def test_sequential_beats_independent_fits():
    net = _net(bn=True)
    x, held = _inputs(192), _inputs(64, seed=9)
    errors = {}
    for sequential in (True, False):
        small, _ = tdconv.compress(net, "tucker", 0.25, layers=LAYERS, calibration=x, sequential=sequential,
                                   input_size=(3, 12, 12), reestimate_bn=False)
        with torch.no_grad():
            errors[sequential] = _rel(small(held), net(held))
    assert errors[True] < errors[False]


def test_cp_refit_lowers_the_calibration_error_of_its_start():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 10, 3, padding=1).double()
    x = torch.randn(40, 8, 6, 6, dtype=torch.float64)
    m = cal.Moments(conv.weight, conv.bias, ConvGeometry.of(conv))
    m.add(x, None)
    m.finish("conv")
    layer = tdconv.FactorizedConv2d.from_conv(conv, "cp", 5, seed=0).double()
    start = cal.LayerFit.of_layer(layer)
    before = cal.output_error(m, start.kernel_aug(10))
    after = cal.output_error(m, cal.fit_cp(m, start, None, True).kernel_aug(10))
    assert after < before


def test_deterministic_and_iterables_of_labelled_batches_are_the_same_data():
    net = _net()
    x = _inputs(96)
    a, _ = tdconv.compress(net, "cp", 6, layers=LAYERS, calibration=x, seed=3, input_size=(3, 12, 12))
    again, _ = tdconv.compress(net, "cp", 6, layers=LAYERS, calibration=x, seed=3, input_size=(3, 12, 12))
    labelled, _ = tdconv.compress(net, "cp", 6, layers=LAYERS, calibration=[(x, torch.zeros(96, dtype=torch.long))],
                                  seed=3, input_size=(3, 12, 12))
    # Other batch sizes sum the float32 chunk products in another order: equal up to rounding.
    batches = [(x[i:i + 32], torch.zeros(32, dtype=torch.long)) for i in range(0, 96, 32)]
    split, _ = tdconv.compress(net, "cp", 6, layers=LAYERS, calibration=iter(batches), seed=3, input_size=(3, 12, 12))
    for (na, pa), pb, pc, pd in zip(a.state_dict().items(), again.state_dict().values(),
                                    labelled.state_dict().values(), split.state_dict().values()):
        assert torch.equal(pa, pb) and torch.equal(pa, pc), na
        assert torch.allclose(pa, pd, rtol=1e-3, atol=1e-4), na


def test_budget_with_calibration_lands_within_two_percent():
    net = _net()
    for target in (0.5, 0.7):
        _, report = tdconv.compress(net, "tucker", target_macs=target, layers=LAYERS, calibration=_inputs(96),
                                    input_size=(3, 12, 12))
        achieved = report.macs_after / report.macs_before
        assert 0.98 * target <= achieved <= target, (target, achieved)


def test_data_tails_follow_the_output_spectrum():
    """With inputs in a 3-dimensional channel subspace, the input-mode tail is zero from rank 3 on."""
    torch.manual_seed(0)
    conv = nn.Conv2d(10, 10, 3, padding=1, bias=False).double()
    x = torch.einsum("cr,nrhw->nchw", torch.randn(10, 3, dtype=torch.float64),
                     torch.randn(50, 3, 5, 5, dtype=torch.float64))
    m = cal.Moments(conv.weight, None, ConvGeometry.of(conv))
    m.add(x, None)
    t_out, t_in = cal.data_tails(m.finish("c"), None)
    assert float(t_in[3]) < 1e-6 < float(t_in[2])
    assert float(t_out[0]) == pytest.approx(1.0) and float(t_out[-1]) == 0.0


# --------------------------------------------------------------------------------------------- options
def test_reestimate_bn_options():
    net = _net()
    x = _inputs(96)
    _, auto = tdconv.compress(net, "cp", 4, layers=LAYERS, calibration=x, input_size=(3, 12, 12), seed=0)
    bn = auto.calibration["batchnorm"]
    assert bn["reestimated"] == (bn["held_out_output_error_reestimated"] < bn["held_out_output_error"])
    small, forced = tdconv.compress(net, "cp", 4, layers=LAYERS, calibration=x, input_size=(3, 12, 12), seed=0,
                                    reestimate_bn=True)
    assert forced.calibration["batchnorm"]["reestimated"]
    assert not torch.equal(small.b4.running_mean, net.b4.running_mean)
    small, off = tdconv.compress(net, "cp", 4, layers=LAYERS, calibration=x, input_size=(3, 12, 12), seed=0,
                                 reestimate_bn=False)
    assert not off.calibration["batchnorm"]["reestimated"]
    assert torch.equal(small.b4.running_mean, net.b4.running_mean)
    with pytest.raises(ValueError, match="reestimate_bn"):
        tdconv.compress(net, "cp", 4, layers=LAYERS, calibration=x, reestimate_bn="yes")


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.block2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.block2(F.relu(x + self.block1(x)))


def test_refine_steps_keep_only_what_lowers_the_held_out_error():
    torch.manual_seed(0)
    net = Blocks().eval()
    x = torch.randn(128, 3, 10, 10)
    small, report = tdconv.compress(net, "cp", 4, layers=["block1.0", "block1.3", "block2.0"], calibration=x,
                                    refine_steps=30, input_size=(3, 10, 10), reestimate_bn=False, seed=0)
    refine = report.calibration["refine"]
    assert [r["block"] for r in refine] == ["block1", "block2"]
    for r in refine:
        assert r["kept"] == (r["held_out_error_after"] < r["held_out_error_before"])
    _, plain = tdconv.compress(net, "cp", 4, layers=["block1.0", "block1.3", "block2.0"], calibration=x,
                               input_size=(3, 10, 10), reestimate_bn=False, seed=0)
    assert plain.calibration["refine"] == []
    assert all(not p.requires_grad or p.grad is None for p in small.parameters())
    with pytest.raises(ValueError, match="refine_steps"):
        tdconv.compress(net, "cp", 4, layers=["block1.0"], calibration=x, refine_steps=-1)


def test_training_flags_and_inplace():
    net = _net().train()
    x = _inputs(64)
    small, _ = tdconv.compress(net, "tucker", 0.5, layers=LAYERS, calibration=x, input_size=(3, 12, 12))
    assert net.training and small.training and all(m.training for m in small.modules())
    assert isinstance(net.c2, nn.Conv2d)
    same, _ = tdconv.compress(net, "tucker", 0.5, layers=LAYERS, calibration=x, input_size=(3, 12, 12),
                              inplace=True)
    assert same is net and isinstance(net.c2, tdconv.FactorizedConv2d)
    net.eval()
    small.eval()
    assert torch.allclose(net(x), small(x))


# --------------------------------------------------------------------------------------------- bad input
def _unchanged(net, before):
    assert all(isinstance(getattr(net, n), nn.Conv2d) for n in LAYERS)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("bad,error,match", [
    (torch.randn(8, 3, 12), ValueError, r"\[N, C, H, W\]"),
    (torch.randn(8, 4, 12, 12), ValueError, "4 channels"),
    (torch.zeros(8, 3, 12, 12, dtype=torch.uint8), TypeError, "floating point"),
    ([], ValueError, "no images"),
    (torch.randn(0, 3, 12, 12), ValueError, "no images"),
    (torch.full((8, 3, 12, 12), float("nan")), ValueError, "non-finite"),
    ([torch.randn(4, 3, 12, 12), "x"], TypeError, "batch 1"),
    (42, TypeError, "iterable"),
])
def test_bad_calibration_is_refused_and_the_model_left_alone(bad, error, match):
    net = _net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(error, match=match):
        tdconv.compress(net, "cp", 4, layers=LAYERS, calibration=bad, input_size=(3, 12, 12))
    _unchanged(net, before)


def test_other_dtype_and_device_are_moved_to_the_model():
    net = _net()
    small, report = tdconv.compress(net, "cp", 4, layers=LAYERS, calibration=_inputs(64, dtype=torch.float64),
                                    input_size=(3, 12, 12), seed=0)
    assert report.calibration["images"] == 56 and report.calibration["held_out_images"] == 8
    assert small.c2.first.dtype == torch.float32


def test_too_few_samples_warn_with_the_numbers():
    net = _net()
    with pytest.warns(cal.CalibrationWarning, match=r"layer 'c4': \d+ calibration patches for a \d+-dimensional"):
        small, _ = tdconv.compress(net, "cp", 4, layers=LAYERS, calibration=_inputs(2), input_size=(3, 12, 12))
    assert all(torch.isfinite(p).all() for p in small.parameters())


class Exploding(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.net = _net()

    def forward(self, x):
        if self.mode == "inf":
            x = x * float("inf")
            return self.net.c2(torch.relu(self.net.c1(x)))
        if x.shape[0] > 1:
            raise RuntimeError("this model only runs one image at a time")
        return self.net(x)


@pytest.mark.parametrize("mode,error,match", [("inf", ValueError, "not finite"),
                                              ("fail", RuntimeError, "forward failed on the calibration data")])
def test_non_finite_activations_and_failing_forwards(mode, error, match):
    model = Exploding(mode)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        tdconv.compress(model, "cp", 4, layers=["net.c2"], calibration=_inputs(16), input_size=(3, 12, 12))
    assert isinstance(model.net.c2, nn.Conv2d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_sequential_must_be_a_bool():
    with pytest.raises(TypeError, match="sequential"):
        tdconv.compress(_net(), "cp", 4, layers=LAYERS, calibration=_inputs(16), sequential="yes")


def test_report_round_trips_with_the_fit_fields():
    _, report = tdconv.compress(_net(), "tucker", 0.5, layers=LAYERS, calibration=_inputs(64),
                                input_size=(3, 12, 12))
    again = tdconv.CompressionReport.from_dict(report.to_dict())
    assert again.calibration == report.calibration
    assert [r.fit for r in again.layers] == [r.fit for r in report.layers]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        str(report)


# --------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("kernel,rank", [(3, (1, 12)), (1, (4, 8))])
def test_tucker_input_rank_above_the_output_unfolding(kernel, rank):
    """R_in may exceed R_out kh kw (a 1x1 conv with R_in > R_out): the directions beyond carry nothing."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 8, kernel, padding=kernel // 2)
    small, report = tdconv.compress(nn.Sequential(conv), "tucker", rank, layers=["0"], calibration=torch.randn(64, 12, 5, 5),
                                    input_size=(12, 5, 5))
    assert report.layers[0].output_error <= report.layers[0].kernel_fit_output_error
    assert small[0].first.shape[0] == rank[1]


def test_solve_falls_back_to_the_positive_part_of_an_indefinite_matrix():
    mat = torch.diag(torch.tensor([10.0, 1.0, 0.1, -1.0], dtype=torch.float64))
    out = cal._solve_right(torch.ones(1, 4, dtype=torch.float64), mat)
    assert torch.allclose(out, torch.tensor([[0.1, 1.0, 10.0, 0.0]], dtype=torch.float64))


def test_last_factor_refit_is_the_least_squares_optimum():
    """At the refit's solution the gradient of the explicit objective (patches, bias, a BatchNorm scale
    D, student inputs other than the teacher's) vanishes."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    x_t = torch.randn(20, 6, 5, 5, dtype=torch.float64)
    x_s = x_t + 0.2 * torch.randn_like(x_t)
    m = cal.Moments(conv.weight, conv.bias, ConvGeometry.of(conv))
    m.add(x_t, x_s)
    m.finish("c")
    d = torch.rand(8, dtype=torch.float64) + 0.5
    layer = tdconv.FactorizedConv2d.from_conv(conv, "cp", 4, seed=0).double()
    fit = cal.refit_last(cal.LayerFit.of_layer(layer), m, with_bias=True)
    last = fit.last.clone().requires_grad_(True)
    bias = fit.bias.clone().requires_grad_(True)
    mid = fit.middle().reshape(4, -1)
    y = conv(x_t).detach()
    ps = cal.patches(x_s, ConvGeometry.of(conv))
    z = ps @ mid.T
    pred = (z @ last.T + bias).reshape(20, 25, 8).permute(0, 2, 1).reshape(20, 8, 5, 5)
    loss = ((y - pred) * d[:, None, None]).square().sum()
    assert float(loss.detach()) > 0
    g_last, g_bias = torch.autograd.grad(loss, (last, bias))
    loss = float(loss.detach())
    assert float(g_last.norm()) < 1e-6 * loss and float(g_bias.norm()) < 1e-6 * loss


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.twice = nn.Conv2d(8, 8, 3, padding=1)
        self.once = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.once(torch.relu(self.twice(torch.relu(self.twice(x)))))


def test_a_conv_called_twice_keeps_its_kernel_fit_with_the_reason():
    _, report = tdconv.compress(Shared(), "cp", 4, layers=["twice", "once"], calibration=torch.randn(32, 3, 6, 6),
                                input_size=(3, 6, 6), seed=0)
    fits = {r.name: r.fit for r in report.layers}
    assert fits["once"] == "data" and fits["twice"].startswith("kernel (called 2 times per forward")


def test_bn_scale_needs_the_conv_output_itself():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(torch.relu_(self.conv(x)))  # modified in place before the BatchNorm

    assert cal.bn_scale_after(InPlace().eval(), ["conv"], torch.randn(2, 3, 5, 5)) == {}


def test_under_eight_images_nothing_is_held_out_and_auto_decides_nothing():
    net = Blocks().eval()
    x = torch.randn(6, 3, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        small, report = tdconv.compress(net, "cp", 4, layers=["block1.0", "block1.3"], calibration=x, refine_steps=5,
                                        input_size=(3, 10, 10), seed=0)
    c = report.calibration
    assert (c["images"], c["held_out_images"]) == (6, 0)
    assert not c["batchnorm"]["reestimated"] and "no held-out images" in c["batchnorm"]["reason"]
    assert c["refine"][0]["steps"] == 0 and not c["refine"][0]["kept"]
    assert torch.equal(small.block1[1].running_mean, net.block1[1].running_mean)
    assert report.layers[0].held_out_error is None


def test_refinement_only_touches_its_block_and_is_undone_when_it_does_not_help(monkeypatch):
    torch.manual_seed(0)
    net = Blocks().eval()
    x = torch.randn(64, 3, 10, 10)
    opts = dict(layers=["block1.3"], calibration=x, input_size=(3, 10, 10), reestimate_bn=False, seed=0)
    small, report = tdconv.compress(net, "cp", 4, refine_steps=20, **opts)
    assert all(p.grad is None for p in small.parameters())
    assert torch.equal(small.block1[0].weight, net.block1[0].weight)  # not selected: not refined
    plain, _ = tdconv.compress(net, "cp", 4, **opts)
    errors = iter([1.0, 2.0])  # held-out error before, after: worse, so undone
    monkeypatch.setattr(cal.SequentialFit, "_block_error", staticmethod(lambda block, xs, ys: next(errors)))
    undone, report = tdconv.compress(net, "cp", 4, refine_steps=20, **opts)
    assert report.calibration["refine"][0]["kept"] is False
    for (k, a), b in zip(plain.state_dict().items(), undone.state_dict().values()):
        assert torch.equal(a, b), k


def test_options_are_checked_without_calibration_too():
    with pytest.raises(ValueError, match="refine_steps needs calibration"):
        tdconv.compress(_net(), "cp", 4, layers=LAYERS, refine_steps=10)
    with pytest.raises(ValueError, match="reestimate_bn"):
        tdconv.compress(_net(), "cp", 4, layers=LAYERS, reestimate_bn="yes")
    with pytest.raises(TypeError, match="sequential"):
        tdconv.compress(_net(), "cp", 4, layers=LAYERS, sequential=1)


def test_calibration_at_another_resolution_warns():
    with pytest.warns(cal.CalibrationWarning, match=r"calibration images are \[\(8, 8\)\].*input_size is \(12, 12\)"):
        tdconv.compress(_net(), "cp", 4, layers=LAYERS, calibration=_inputs(32, hw=8), input_size=(3, 12, 12))
