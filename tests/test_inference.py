"""The deployment path: layouts in and out of the fused ops, optimize_for_inference, to_standard, the
FLOP counters, ONNX, torch.export and jit.trace."""
import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tdconv
from tdconv import reference

METHOD_RANKS = {"cp": 6, "cp4": 6, "tucker": (6, 5)}


def _layer(method, bias=True, cin=8, cout=12, stride=1, dtype=torch.float64, implementation="auto", seed=0):
    torch.manual_seed(seed)
    return tdconv.FactorizedConv2d(cin, cout, 3, stride, 1, bias=bias, method=method, rank=METHOD_RANKS[method],
                                   implementation=implementation, dtype=dtype)


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("op", ["cp_conv2d", "tucker_conv2d"])
def test_ops_return_the_input_layout_and_equal_the_reference(require_ext, op):
    # Both store paths (NCHW and channels_last), the small-call BLAS path (< 256 output pixels) and the
    # packed one, one image and groups of whole images, with and without the fused ReLU.
    g = torch.Generator().manual_seed(0)
    tucker = op == "tucker_conv2d"
    for (n, c, h, w, stride), relu, has_bias in itertools.product(
            [(1, 9, 6, 5, 1), (3, 9, 13, 11, 2), (60, 9, 3, 2, 1), (2, 9, 24, 20, 1)], [False, True], [False, True]):
        x = torch.randn(n, c, h, w, dtype=torch.float64, generator=g)
        first = torch.randn(5, c, dtype=torch.float64, generator=g)
        spatial = torch.randn(*((4, 5) if tucker else (5,)), 3, 3, dtype=torch.float64, generator=g)
        last = torch.randn(7, 4 if tucker else 5, dtype=torch.float64, generator=g)
        bias = torch.randn(7, dtype=torch.float64, generator=g) if has_bias else None
        args = (first, spatial, last, bias, [stride, stride], [1, 1], [1, 1], relu)
        expected = getattr(reference, op)(x, *args)
        assert (expected >= 0).all() or not relu
        for xi, fmt in ((x, torch.contiguous_format), (x.to(memory_format=torch.channels_last), torch.channels_last),
                        (x.transpose(2, 3).contiguous().transpose(2, 3), torch.contiguous_format)):
            y = getattr(torch.ops.tdconv, op)(xi, *args)
            assert y.is_contiguous(memory_format=fmt), (n, h, w, fmt)
            assert tdconv.ops.output_memory_format(xi) == fmt
            torch.testing.assert_close(y, expected, atol=1e-11, rtol=1e-10, msg=f"{op} {n}x{h}x{w} relu={relu}")


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_every_implementation_returns_the_layout_of_conv2d(require_ext, method):
    # every implementation, in training mode (the ordinary path), in eval mode (the prepared call) and
    # prepacked; NCHW, channels_last and a strided channels_last view; >= 256 output pixels (packed
    # 1x1 stages) and fewer (BLAS)
    layers = {impl: _layer(method, implementation=impl) for impl in ("auto", "fused", "unfused")}
    layers["prepacked"] = copy.deepcopy(layers["fused"]).eval().prepare_for_inference()
    conv = nn.Conv2d(8, 12, 3, padding=1, dtype=torch.float64)
    x = torch.randn(4, 8, 10, 10, dtype=torch.float64)
    x_cl = x.to(memory_format=torch.channels_last)
    for xi in (x, x_cl, x_cl[..., 1:], x[:1, :, :5]):
        want = conv(xi)
        want_cl = not want.is_contiguous() and want.is_contiguous(memory_format=torch.channels_last)
        results = []
        for impl, layer in layers.items():
            for training in ((False,) if impl == "prepacked" else (True, False)):
                with torch.no_grad():
                    y = layer.train(training)(xi)
                got_cl = not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
                assert got_cl == want_cl, (impl, training, xi.stride())
                assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
                results.append(y)
        for y in results[1:]:  # every layout and implementation: the same values
            torch.testing.assert_close(y, results[0], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(results[0], layers["unfused"].to_chain()(xi), atol=1e-12, rtol=1e-10)


def test_fused_relu_gradients_match_the_chain(require_ext):
    for method in ("cp", "tucker"):
        layer = _layer(method, implementation="fused")
        layer.fused_relu = True
        x = torch.randn(2, 8, 7, 7, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda x, f, s, l, b: tdconv.ops.cp_conv2d(x, f, s, l, b, (1, 1), (1, 1), (1, 1), True)
                                 if method == "cp" else
                                 tdconv.ops.tucker_conv2d(x, f, s, l, b, (1, 1), (1, 1), (1, 1), True),
                                 (x, layer.first.flatten(1).detach().requires_grad_(),
                                  (layer.spatial[:, 0] if method == "cp" else layer.spatial).detach().requires_grad_(),
                                  layer.last.flatten(1).detach().requires_grad_(), layer.bias.detach().requires_grad_()))
        chain = layer.to_chain()
        assert isinstance(chain[-1], nn.ReLU)
        torch.testing.assert_close(layer(x), chain(x))


# ---------------------------------------------------------------------------------------------- optimize_for_inference
class _Block(nn.Module):
    """conv -> BN -> ReLU (foldable and fusable), conv -> BN -> + x -> ReLU (foldable, not fusable), and
    a functional ReLU after a BN-free conv."""

    def __init__(self, method, bias):
        super().__init__()
        self.conv1 = _layer(method, bias, 8, 8, seed=1)
        self.bn1 = nn.BatchNorm2d(8, dtype=torch.float64)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _layer(method, bias, 8, 8, seed=2)
        self.bn2 = nn.BatchNorm2d(8, affine=False, dtype=torch.float64)
        self.conv3 = _layer(method, bias, 8, 8, seed=3)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + x)
        return F.relu(self.conv3(y))


def _trained_block(method, bias):
    block = _Block(method, bias)
    with torch.no_grad():  # BatchNorm statistics and affine parameters far from the identity
        for bn in (block.bn1, block.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        block.bn1.weight.uniform_(0.5, 2)
        block.bn1.bias.uniform_(-1, 1)
    return block.eval()


@pytest.mark.parametrize("method,bias", itertools.product(["cp", "cp4", "tucker"], [True, False]))
def test_optimize_for_inference_equals_the_model(require_ext, method, bias):
    block = _trained_block(method, bias)
    before = copy.deepcopy(block.state_dict())
    opt, info = tdconv.optimize_for_inference(block, report=True)
    assert sorted(info.folded) == ["conv1", "conv2"] and sorted(info.fused_relu) == ["conv1", "conv3"]
    assert sorted(info.prepared) == ["conv1", "conv2", "conv3"] and info.skipped is None
    assert isinstance(opt, torch.fx.GraphModule) and not hasattr(opt, "bn1") and not hasattr(opt, "bn2")
    assert opt.conv1.fused_relu and not opt.conv2.fused_relu and opt.conv3.fused_relu
    assert opt.conv1.bias is not None and opt.conv2.bias is not None  # created by the folding where missing
    for k, v in block.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    x = torch.randn(8, 8, 9, 9, dtype=torch.float64)  # 648 output pixels: the prepacked 1x1 stages too
    with torch.no_grad():
        expected = block(x)
        for xi in (x, x.to(memory_format=torch.channels_last), x[:1]):  # x[:1]: 81 pixels, BLAS stages
            y, want = opt(xi), block(xi)
            torch.testing.assert_close(y, expected[: xi.shape[0]], atol=1e-10, rtol=1e-9)
            assert y.is_contiguous() == want.is_contiguous()  # the layout of the model before it
            assert y.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
                memory_format=torch.channels_last)
    # under autograd (eval mode, no torch.no_grad): the same values, and gradients reach the input
    xg = x.clone().requires_grad_()
    y = opt(xg)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-9)
    y.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_optimize_for_inference_refuses_training_mode_and_bad_arguments():
    block = _trained_block("cp", True).train()
    with pytest.raises(ValueError, match=r"eval mode.*model\.eval\(\)"):
        tdconv.optimize_for_inference(block)
    block.eval()
    block.bn1.train()
    with pytest.raises(ValueError, match="bn1"):
        tdconv.optimize_for_inference(block)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        tdconv.optimize_for_inference(lambda x: x)
    with pytest.raises(TypeError, match="fold_batchnorm must be a bool"):
        tdconv.optimize_for_inference(block.eval(), fold_batchnorm=1)


def test_prepared_layer_follows_parameter_changes_and_copies(require_ext):
    layer = _layer("tucker").eval().prepare_for_inference()
    x = torch.randn(8, 8, 6, 6, dtype=torch.float64)  # 288 output pixels: the prepacked 1x1 stages
    with torch.no_grad():
        y0 = layer(x)
        layer.last.mul_(2)  # in place: the plan must not compute with the old factor
        torch.testing.assert_close(layer(x), 2 * (y0 - layer.bias[:, None, None]) + layer.bias[:, None, None])
        layer.load_state_dict(_layer("tucker", seed=5).state_dict())
        torch.testing.assert_close(layer(x), _layer("tucker", seed=5).eval()(x))
        twin = copy.deepcopy(layer)
        twin.first.zero_()
        torch.testing.assert_close(twin(x), twin.bias[:, None, None].expand_as(y0))
        assert not torch.equal(layer(x), twin(x))  # the copy's plan is its own
        layer.implementation = "unfused"
        torch.testing.assert_close(layer(x), _layer("tucker", seed=5).eval()(x))


def test_untraceable_model_keeps_its_function_with_a_warning(require_ext):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _layer("cp", True, 8, 8)
            self.bn = nn.BatchNorm2d(8, dtype=torch.float64).eval()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.conv(x)

    model = Branchy().eval()
    with pytest.warns(UserWarning, match="torch.fx could not trace"):
        opt, info = tdconv.optimize_for_inference(model, report=True)
    assert info.folded == [] and info.prepared == ["conv"] and "trace" in info.skipped
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


def test_shared_layer_is_not_folded(require_ext):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _layer("cp", True, 8, 8)
            self.bn = nn.BatchNorm2d(8, dtype=torch.float64)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    model = Shared().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
    opt, info = tdconv.optimize_for_inference(model, report=True)
    assert info.folded == [] and info.fused_relu == []
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


# ---------------------------------------------------------------------------------------------- to_standard
def test_to_standard_has_no_custom_op_and_the_same_function(require_ext):
    block = tdconv.optimize_for_inference(_trained_block("tucker", False))
    std = tdconv.to_standard(block)
    assert not any(isinstance(m, tdconv.FactorizedConv2d) for m in std.modules())
    assert any(isinstance(m, tdconv.FactorizedConv2d) for m in block.modules())  # a copy
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(std(x), block(x), atol=1e-10, rtol=1e-9)
    graph = torch.jit.trace(std, (x,)).inlined_graph
    assert "tdconv" not in str(graph)
    with pytest.raises(ValueError, match="fused ReLU"):
        block.conv1.to_conv()


# ---------------------------------------------------------------------------------------------- counters
def _chain_model(model):
    return tdconv.to_standard(model)


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_flop_counter_counts_the_fused_ops_as_their_chain(require_ext, method):
    from torch.utils.flop_counter import FlopCounterMode

    block = tdconv.optimize_for_inference(_trained_block(method, True))
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    counts = []
    for model in (block, _chain_model(block)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        counts.append(counter.get_total_flops())
    if method == "cp4":  # documented: the op computes (and is counted with) the kh x kw product filter
        layer = block.conv3
        per_layer = 2 * 2 * 9 * 9 * 6 * (3 * 3 - (3 + 3))  # batch 2, 9x9 output, rank 6: kh*kw against kh+kw
        assert counts[0] - counts[1] == 3 * per_layer and layer.method == "cp4"
    else:
        assert counts[0] == counts[1] > 0
    # the fused op ran (not the chain) while counting: the count comes from the registered formula
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        block.conv3(x)
    assert any("tdconv" in str(op) for op in counter.get_flop_counts()["Global"])


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_ptflops_counts_a_compressed_model_as_its_chain(require_ext, method):
    ptflops = pytest.importorskip("ptflops")
    block = tdconv.optimize_for_inference(_trained_block(method, True))
    layer_model = _trained_block(method, True)  # not optimised: BatchNorm modules, no fused ReLU
    for model in (block, layer_model):
        std = _chain_model(model)
        common = dict(as_strings=False, print_per_layer_stat=False, backend="pytorch")
        for functional, implementation in itertools.product([False, True], ["fused", "unfused"]):
            for m in model.modules():  # the count must not depend on the path a layer takes
                if isinstance(m, tdconv.FactorizedConv2d):
                    m.implementation = implementation
            cfg = {"count_functional": functional}
            got = ptflops.get_model_complexity_info(model.float(), (8, 9, 9), custom_modules_hooks=tdconv.ptflops_hooks(),
                                                    backend_specific_config=cfg, **common)
            want = ptflops.get_model_complexity_info(std.float(), (8, 9, 9), backend_specific_config=cfg, **common)
            assert got == want and got[0] > 0, (method, functional, implementation)
        if method != "cp4":  # the aten backend counts the op's kh x kw filter, not cp4's two 1-D ones
            got = ptflops.get_model_complexity_info(model.float(), (8, 9, 9), as_strings=False, backend="aten",
                                                    print_per_layer_stat=False,
                                                    custom_modules_hooks=tdconv.ptflops_aten_hooks())
            want = ptflops.get_model_complexity_info(std.float(), (8, 9, 9), as_strings=False, backend="aten",
                                                     print_per_layer_stat=False)
            assert got == want and got[0] > 0, method


# ---------------------------------------------------------------------------------------------- exporters
def _resnet_block_model(method):
    torch.manual_seed(0)
    from torchvision.models.resnet import BasicBlock

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), BasicBlock(16, 16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    model, _ = tdconv.compress(model, method, 0.5, layers=["3.conv1", "3.conv2"], n_iter_max=5, progress=False)
    return model.eval()


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("optimized", [False, True])
def test_onnx_runtime_matches_pytorch(require_ext, tmp_path, method, dynamo, optimized):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = _resnet_block_model(method)
    if optimized:
        model = tdconv.optimize_for_inference(model)
    x = torch.randn(2, 3, 12, 12)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"])
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and not any("tdconv" in o for o in ops)  # lowered to standard convolutions
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["cp", "cp4", "tucker"])
def test_torch_export_and_jit_trace_keep_the_fused_op_and_match_eager(require_ext, method):
    model = tdconv.optimize_for_inference(_resnet_block_model(method))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("tdconv.") for t in targets), targets
    torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
    assert "tdconv::" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(traced(x[:1]), model(x[:1]), atol=1e-5, rtol=1e-5)


def test_prepacked_op_equals_the_op_and_refuses_a_foreign_pack(require_ext):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 10, 10, generator=g)
    first, core, last, bias = (torch.randn(*s, generator=g) for s in [(5, 9), (4, 5, 3, 3), (7, 4), (7,)])
    conv = ([1, 1], [1, 1], [1, 1])
    for relu in (False, True):
        packs = torch.ops.tdconv.pack_factors(first, core, last, bias, True)
        y = torch.ops.tdconv.factorized_conv2d_prepacked(x, first, core, last, bias, *conv, relu, True, *packs)
        torch.testing.assert_close(y, torch.ops.tdconv.tucker_conv2d(x, first, core, last, bias, *conv, relu))
    other = torch.ops.tdconv.pack_factors(first[:, :8], core, last, bias, True)  # packed for 8 input channels
    with pytest.raises(RuntimeError, match="first_packed does not match first"):
        torch.ops.tdconv.factorized_conv2d_prepacked(x, first, core, last, bias, *conv, False, True, *other)
    cp_packs = torch.ops.tdconv.pack_factors(first, core[0], last[:, :5], None, False)
    with pytest.raises(RuntimeError, match="core_packed does not match"):
        torch.ops.tdconv.factorized_conv2d_prepacked(x, first, core, last, bias, *conv, False, True, *cp_packs)


def test_prepared_call_follows_requires_grad_configuration_and_inference_tensors(require_ext):
    layer = _layer("cp").eval()
    x = torch.randn(8, 8, 6, 6, dtype=torch.float64)
    for p in layer.parameters():
        p.requires_grad_(False)
    layer(x)  # a plan built for frozen parameters
    for p in layer.parameters():
        p.requires_grad_(True)
    y = layer(x)
    assert y.grad_fn is not None  # unfrozen: gradients flow again
    y.sum().backward()
    assert layer.first.grad is not None
    with torch.no_grad():
        layer.padding = (0, 0)  # a changed argument: the plan must not keep the old padding
        assert layer(x).shape[-2:] == (4, 4)
    with torch.inference_mode():  # parameters made under inference mode have no version counter
        frozen = _layer("tucker").eval()
        assert frozen(x).shape == (8, 12, 6, 6)
    with torch.no_grad():  # outside inference mode, in eval (the plan) and in training (the ordinary path)
        torch.testing.assert_close(frozen(x), frozen.train()(x))


def test_fused_relu_keeps_nan_as_torch_relu(require_ext):
    layer = _layer("cp", implementation="fused").eval()
    layer.fused_relu = True
    x = torch.randn(8, 8, 6, 6, dtype=torch.float64)
    x[0, :, 2, 2] = float("nan")
    with torch.no_grad():
        for prepack in (False, True):
            y = layer.prepare_for_inference(prepack=prepack)(x)
            want = torch.relu(layer.to_chain()[:-1](x))
            assert torch.equal(y.isnan(), want.isnan()) and want.isnan().any()
            torch.testing.assert_close(y, want, equal_nan=True)


def test_optimize_inplace_keeps_the_model_consistent_and_bare_layers_do_not_warn(require_ext):
    block = _trained_block("tucker", False)
    x = torch.randn(8, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
        opt = tdconv.optimize_for_inference(block, inplace=True)
        assert isinstance(block.bn1, nn.Identity) and opt.conv1 is block.conv1
        torch.testing.assert_close(block(x), expected, atol=1e-10, rtol=1e-9)  # the original: unchanged function
        torch.testing.assert_close(opt(x), expected, atol=1e-10, rtol=1e-9)
    layer = _layer("cp").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = tdconv.optimize_for_inference(layer)
    assert isinstance(same, tdconv.FactorizedConv2d)


def test_optimize_folds_batchnorm_after_standard_convs_too(require_ext):
    model = _resnet_block_model("tucker").double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    opt, info = tdconv.optimize_for_inference(model, report=True)
    assert "0" in info.folded and "3.conv1" in info.folded and "3.conv2" in info.folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in opt.modules())
    assert isinstance(model[1], nn.BatchNorm2d)  # a copy
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-10, rtol=1e-9)


def test_prepared_call_steps_aside_without_the_extension(monkeypatch):
    # A source tree that was never built has no tdconv ops: an eval-mode layer and an optimised model
    # must still run (the chain), with no reference to the missing ops.
    from tdconv import _ext
    layer = _layer("tucker").eval()
    x = torch.randn(8, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = layer.to_chain()(x)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_REASON", "simulated: no extension")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        assert layer._inference_plan._p.op is None
        opt = tdconv.optimize_for_inference(_trained_block("cp", True))
        assert opt(x).shape == (8, 8, 6, 6)
