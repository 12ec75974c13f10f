import sys

import pytest
import torch
import torchvision
from torch import nn

import tdconv
from tdconv.compress import count_complexity, select_layers

FAST = dict(n_iter_max=2, seed=0)


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_seed_complexity_figures(require_ext):
    # The seed's figures (ptflops at 3x32x32): 37.18 MMac / 11.18 M dense; 20.49 MMac / 5.62 M with
    # conv2 of every BasicBlock CP-factorised at rank C/2, each factorised layer with a bias.
    model = _resnet18()
    macs, params = count_complexity(model, (3, 32, 32))
    assert (f"{macs / 1e6:.2f}", f"{params / 1e6:.2f}") == ("37.18", "11.18")
    small, report = tdconv.compress(model, "cp", 0.5, layers="seed", bias=True, **FAST)
    assert (f"{report.macs_after / 1e6:.2f}", f"{report.params_after / 1e6:.2f}") == ("20.49", "5.62")
    assert (report.macs_before, report.params_before) == (macs, params)
    assert [r.rank for r in report.layers] == [32, 32, 64, 64, 128, 128, 256, 256]
    # Without the added bias: 15360 MACs and 1920 parameters fewer.
    _, plain = tdconv.compress(model, "cp", 0.5, layers="seed", **FAST)
    assert (report.macs_after - plain.macs_after, report.params_after - plain.params_after) == (15360, 1920)
    # The per-layer figures add up to the totals.
    assert sum(r.macs_before - r.macs_after for r in report.layers) == report.macs_before - report.macs_after
    assert sum(r.params_before - r.params_after for r in report.layers) == report.params_before - report.params_after


def test_compressed_model_computes_its_reconstructed_kernels(require_ext):
    model = _resnet18()
    small, report = tdconv.compress(model, "tucker", (64, 64), layers=["layer4.1.conv2"], **FAST)
    f = small.get_submodule("layer4.1.conv2")
    assert isinstance(f, tdconv.FactorizedConv2d) and f.rank == (64, 64)
    ref = _resnet18()
    ref.get_submodule("layer4.1").conv2 = f.to_conv()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(small(x), ref(x), rtol=1e-4, atol=1e-5)
    # the report's error is the kernel's
    w = model.get_submodule("layer4.1.conv2").weight.detach().double()
    k = f.kernel().detach().double()
    assert abs(report.layers[0].rel_error - float((k - w).norm() / w.norm())) < 1e-12


def test_layer_selection_forms():
    model = _resnet18()
    selected, skipped = select_layers(model)
    # every conv and linear layer but the stem: the 16 3x3 convs, the 3 downsampling 1x1 convs, the classifier
    assert len(selected) == 20 and sum(n.endswith(("conv1", "conv2")) for n in selected) == 16
    assert [n for n in selected if "downsample" in n] == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    assert selected[-1] == "fc" and "conv1" not in selected
    assert skipped == [("conv1", "input conv (3 input channels) left dense")]
    assert select_layers(model, "seed")[0] == [f"layer{i}.{j}.conv2" for i in (1, 2, 3, 4) for j in (0, 1)]
    assert select_layers(model, ["layer1.0.conv1", "layer2.0.downsample.0"])[0] == \
        ["layer1.0.conv1", "layer2.0.downsample.0"]
    assert select_layers(model, lambda m, n: isinstance(m, nn.Conv2d) and m.out_channels == 512)[0] == \
        ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"]
    with pytest.raises(ValueError, match=r"does not have: \['layer9.conv'\]"):
        select_layers(model, ["layer9.conv"])
    with pytest.raises(ValueError, match="not nn.Conv2d"):
        select_layers(model, ["layer1.0.bn1"])
    with pytest.raises(ValueError, match="layers must be"):
        select_layers(model, "all")
    with pytest.raises(TypeError, match="layers must be"):
        select_layers(model, 3)


def test_inplace_overrides_and_options(require_ext):
    model = _resnet18()
    small, report = tdconv.compress(model, "cp", 0.5, layers="seed", overrides={"layer4.1.conv2": 100}, **FAST)
    assert isinstance(model.layer4[1].conv2, nn.Conv2d)  # the original is untouched
    assert small.layer4[1].conv2.rank == 100 and small.layer4[0].conv2.rank == 256
    out, _ = tdconv.compress(model, "cp4", 8, layers=["layer1.0.conv2"], inplace=True, **FAST)
    assert out is model and model.layer1[0].conv2.method == "cp4"
    assert "layer" in str(report) and report.to_json().startswith("{") and report.to_markdown().startswith("|")


@pytest.mark.parametrize("name,kwargs,expected_skips", [
    # the stem, and the 1x1 convs and classifier a spatial-conv method leaves dense
    ("resnet50", dict(method="tucker", rank=0.25), 1 + 36 + 1),
    ("vgg11_bn", dict(method="cp", rank=0.25), 1 + 3),
    ("mobilenet_v2", dict(method="cp", rank=4, layers=lambda m, n: isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)),
     17),
])
def test_torchvision_models(require_ext, name, kwargs, expected_skips):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    small, report = tdconv.compress(model, n_iter_max=1, **kwargs)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    # The totals are what ptflops counts on the compressed model, and they change by exactly what the
    # per-layer rows say (each row: the dense conv's count and the factorised layer's chain).
    assert (report.macs_after, report.params_after) == count_complexity(small, (3, 32, 32))
    assert report.macs_before - report.macs_after == sum(r.macs_before - r.macs_after for r in report.layers)
    assert report.params_before - report.params_after == sum(r.params_before - r.params_after for r in report.layers)
    for r in report.layers:
        layer = small.get_submodule(r.name)
        assert isinstance(layer, tdconv.FactorizedConv2d) and r.params_after == layer.num_params()
        assert r.params_before == sum(p.numel() for p in model.get_submodule(r.name).parameters())
    assert len(report.skipped) == expected_skips
    if name == "mobilenet_v2":
        assert all("depthwise" in why for _, why in report.skipped)
    else:
        assert all("input conv" in why or "gives no method" in why for _, why in report.skipped)


def test_inplace_failure_leaves_the_model_unchanged(require_ext):
    # An error in the middle of the layers (here: an option the second method cannot take, or a
    # decomposition that fails on a later layer) must not leave a half-compressed model behind.
    model = _resnet18()
    with torch.no_grad():
        model.layer4[1].conv2.weight[0, 0, 0, 0] = float("nan")  # the last of the 8 seed layers
    modules = dict(model.named_modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or Inf"):
        tdconv.compress(model, "cp", 0.5, layers="seed", inplace=True, **FAST)
    with pytest.raises(TypeError, match="unexpected decomposition options"):
        tdconv.compress(model, "tucker", 0.5, layers="seed", inplace=True, init="random")
    assert all(type(m) is not tdconv.FactorizedConv2d for m in model.modules())
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)  # the same module objects
    state = model.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[k], v) or torch.allclose(state[k], v, equal_nan=True) for k, v in before.items())


def test_seed_option_for_every_method(require_ext):
    model = _resnet18()
    a, _ = tdconv.compress(model, "tucker", 0.5, layers=["layer1.0.conv2"], seed=0)
    b, _ = tdconv.compress(model, "tucker", 0.5, layers=["layer1.0.conv2"], seed=1)
    torch.testing.assert_close(a.layer1[0].conv2.kernel(), b.layer1[0].conv2.kernel())
    with pytest.raises(TypeError, match="seed must be an integer"):
        tdconv.compress(model, "cp", 0.5, layers=["layer1.0.conv2"], seed=0.5)


def test_bad_input(require_ext):
    model = _resnet18()
    with pytest.raises(ValueError, match="bias must be None"):
        tdconv.compress(model, "cp", 0.5, layers="seed", bias="yes")
    biased = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False))
    with pytest.raises(ValueError, match=r"bias=False would drop the bias of \['0'\]"):
        tdconv.compress(biased, "cp", 4, bias=False, input_size=(8, 8, 8))
    small, _ = tdconv.compress(biased, "cp", 4, layers=["1"], bias=False, input_size=(8, 8, 8), **FAST)
    assert small[1].bias is None
    with pytest.raises(ValueError, match="method must be one of"):
        tdconv.compress(model, "svd4")
    with pytest.raises(ValueError, match="no layer to factorise"):
        tdconv.compress(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"rank for layer 'layer1.0.conv2' \(tucker, 64x64\).*out of range"):
        tdconv.compress(model, "tucker", (128, 128), layers="seed")
    with pytest.raises(ValueError, match="overrides names layers that are not selected"):
        tdconv.compress(model, "cp", 0.5, layers="seed", overrides={"layer1.0.conv1": 3})
    with pytest.raises(ValueError, match="input_size must be"):
        tdconv.compress(model, "cp", 0.5, layers="seed", input_size=(32, 32))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        tdconv.compress("resnet18")


def test_save_load_round_trip(require_ext, tmp_path):
    model = _resnet18()
    small, _ = tdconv.compress(model, "tucker", 0.5, layers="seed", **FAST)
    small.layer1[0].conv2.implementation = "unfused"
    path = tmp_path / "small.pt"
    tdconv.save(small, path)
    rebuilt = tdconv.load(path, _resnet18())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), small(x))
    assert rebuilt.layer1[0].conv2.implementation == "unfused"
    for a, b in zip(rebuilt.state_dict().values(), small.state_dict().values()):
        assert torch.equal(a, b)


def test_load_bad_files(require_ext, tmp_path):
    model = _resnet18()
    small, _ = tdconv.compress(model, "cp", 0.5, layers="seed", **FAST)
    good = tmp_path / "good.pt"
    tdconv.save(small, good)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tdconv.load(tmp_path / "missing.pt", _resnet18())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable tdconv file"):
        tdconv.load(truncated, _resnet18())
    foreign = tmp_path / "foreign.pt"
    torch.save(model.state_dict(), foreign)
    with pytest.raises(ValueError, match="not a file written by tdconv.save"):
        tdconv.load(foreign, _resnet18())
    with pytest.raises(ValueError, match="model has no modules named"):
        tdconv.load(good, nn.Sequential(nn.Conv2d(3, 3, 3)))


def test_load_never_runs_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code from a file ran",))
    path = tmp_path / "evil.pt"
    torch.save({"format": "tdconv.compressed", "version": 1, "layers": {}, "state_dict": {"x": Payload()}}, path)
    with pytest.raises(ValueError, match="not a readable tdconv file"):
        tdconv.load(path, nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("method,kind,target", [("cp", "macs", 0.5), ("tucker", "macs", 0.5), ("cp", "params", 0.3),
                                                ("tucker", "params", 0.3)])
def test_budget_is_met_within_two_percent(require_ext, method, kind, target):
    model = _resnet18()
    _, report = tdconv.compress(model, method, **{f"target_{kind}": target}, n_iter_max=1)
    before, after = ((report.macs_before, report.macs_after) if kind == "macs"
                     else (report.params_before, report.params_after))
    assert 0.98 * target * before <= after <= target * before


def test_budget_spends_where_the_error_drops(require_ext):
    # A kernel of exact Tucker rank (8, 8) next to a random one: the budget gives the first about its
    # true ranks (beyond them its error is already zero) and the rest to the second.
    from conftest import planted_tucker
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(planted_tucker((64, 64, 3, 3), (8, 8), (0, 1), dtype=torch.float32))
    _, report = tdconv.compress(model, "tucker", target_params=0.5, input_size=(64, 8, 8))
    low, rand = report.layers
    assert low.rank[0] >= 8 and low.rank[1] >= 8 and low.rel_error < 1e-3
    assert rand.params_after > 4 * low.params_after


def test_budget_errors(require_ext):
    model = _resnet18()
    with pytest.raises(ValueError, match=r"unreachable.*smallest achievable is 0\.49"):
        tdconv.compress(model, "cp", target_macs=0.3, layers="seed")
    # an 8x8 conv: Tucker ranks (7, 7) cost 553 of its 576 parameters, (8, 8) more than it; at a budget
    # of all its parameters it stays dense, with the reason
    net = nn.Sequential(nn.Conv2d(8, 8, 3, bias=False))
    same, report = tdconv.compress(net, "tucker", target_params=1.0, input_size=(8, 8, 8))
    assert isinstance(same[0], nn.Conv2d) and report.layers == []
    assert report.skipped[0][0] == "0" and "left dense by the budget" in report.skipped[0][1]
    # its largest rank also cheaper in MACs than the dense conv, (6, 6), has 0.73 of its parameters; the
    # next choice is the dense conv: nothing lands within 2 % of 0.99
    with pytest.raises(ValueError, match=r"target_params=0.99 cannot be met within 2 %.*0\.7292"):
        tdconv.compress(net, "tucker", target_params=0.99, input_size=(8, 8, 8))
    with pytest.raises(ValueError, match=r"target_macs must be a fraction in \(0, 1\]"):
        tdconv.compress(model, "cp", target_macs=1.5)
    with pytest.raises(ValueError, match="at most one of target_macs and target_params"):
        tdconv.compress(model, "cp", target_macs=0.5, target_params=0.5)


# ---------------------------------------------------------------------------------------------- data-driven ranks
@pytest.mark.parametrize("shape,rank,noise", [((64, 576), 8, 0.1), ((512, 4608), 40, 0.05), ((100, 100), 10, 0.01),
                                              ((576, 64), 8, 0.1)])
def test_evbmf_recovers_planted_ranks(shape, rank, noise):
    from tdconv.ranks import evbmf_rank
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ \
        torch.randn(rank, shape[1], generator=g, dtype=torch.float64)
    y = a + noise * a.std() * torch.randn(*shape, generator=g, dtype=torch.float64)
    assert evbmf_rank(y) == rank


def test_evbmf_on_degenerate_matrices():
    from tdconv.ranks import energy_rank, evbmf_rank
    g = torch.Generator().manual_seed(0)
    assert evbmf_rank(torch.randn(64, 576, generator=g)) == 1  # noise only: the smallest usable rank
    assert evbmf_rank(torch.zeros(8, 8)) == 1
    assert evbmf_rank(torch.randn(1, 9, generator=g)) == 1
    assert evbmf_rank(torch.randn(2, 3, generator=g)) >= 1
    assert energy_rank(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 0.9) == 2  # 9+4 of 14 >= 0.9
    assert energy_rank(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 1.0) == 3
    with pytest.raises(ValueError, match="expects a matrix"):
        evbmf_rank(torch.zeros(2, 2, 2))


def test_compress_with_data_driven_ranks(require_ext):
    from conftest import planted_tucker
    model = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1, bias=False))
    with torch.no_grad():
        w = planted_tucker((48, 32, 3, 3), (6, 5), (0, 1), dtype=torch.float32)
        model[0].weight.copy_(w + 1e-3 * w.std() * torch.randn_like(w))
    _, report = tdconv.compress(model, "tucker", "evbmf", input_size=(32, 8, 8))
    assert report.layers[0].rank == [6, 5] and report.layers[0].rel_error < 1e-2
    _, report = tdconv.compress(model, "cp", "energy=0.999", input_size=(32, 8, 8), seed=0)
    assert report.layers[0].rank == 6
    with pytest.raises(ValueError, match="rank must be an int, a pair, a fraction, 'evbmf' or 'energy=F'"):
        tdconv.compress(model, "cp", "vbmf", input_size=(32, 8, 8))
    with pytest.raises(ValueError, match=r"energy must be a fraction in \(0, 1\]"):
        tdconv.compress(model, "cp", "energy=2", input_size=(32, 8, 8))


def test_budget_min_rank_floor(require_ext):
    model = _resnet18()
    _, report = tdconv.compress(model, "tucker", target_macs=0.5, min_rank=0.125, n_iter_max=1)
    assert all(r.rank[0] >= r.kernel_shape[0] / 8 and r.rank[1] >= r.kernel_shape[1] / 8 for r in report.layers)
    assert 0.98 * 0.5 * report.macs_before <= report.macs_after <= 0.5 * report.macs_before
    with pytest.raises(ValueError, match=r"unreachable.*every selected layer at min_rank=0\.9"):
        tdconv.compress(model, "tucker", target_macs=0.5, min_rank=0.9)
    with pytest.raises(ValueError, match=r"min_rank must be a fraction in \[0, 1\)"):
        tdconv.compress(model, "tucker", target_macs=0.5, min_rank=1.0)


@pytest.mark.parametrize("method", ["cp", "tucker"])
def test_equal_layers_are_decomposed_in_one_batched_call(require_ext, monkeypatch, method):
    # Layers of one kernel shape, method and rank go to the engine as one batch (one sequence of GPU
    # launches instead of one per layer); each result is the layer's own decomposition.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    calls = []
    cmod = sys.modules["tdconv.compress"]  # the module (tdconv.compress is the function)
    real = cmod.decompose_batch
    monkeypatch.setattr(cmod, "decompose_batch", lambda ts, *a, **k: calls.append(len(ts)) or real(ts, *a, **k))
    single, real_single = [], cmod.decompose_kernel
    monkeypatch.setattr(cmod, "decompose_kernel", lambda w, *a, **k: single.append(tuple(w.shape)) or real_single(w, *a, **k))
    rank = 6 if method == "cp" else (6, 6)
    out, _ = tdconv.compress(model, method, rank=rank, input_size=(8, 6, 6), seed=0)
    assert calls == [3] and single == [(16, 8, 3, 3)]  # the batched layers are not decomposed again
    for i in (0, 2, 4, 6):
        expected = tdconv.FactorizedConv2d.from_decomposition(
            model[i], method, tdconv.decomposition.decompose_kernel(model[i].weight.detach(), method, rank, seed=0))
        torch.testing.assert_close(out[i].kernel(), expected.kernel(), rtol=1e-4, atol=1e-5)
