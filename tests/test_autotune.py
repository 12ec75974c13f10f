import pytest
import torch
from torch import nn

import tdconv
from tdconv.nn import Autotuner, autotuner


class _Clock:
    """A stopwatch that the candidates advance by fixed amounts."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def step(self, seconds):
        def fn():
            self.now += seconds
        return fn


@pytest.mark.parametrize("fused_s,keeps_fused", [(1.05, True), (1.0, True), (0.5, True), (1.2, False)])
def test_the_chain_needs_a_margin(fused_s, keeps_fused):
    # The chain (1 s per call) is chosen only when it is faster than the fused op by more than the margin.
    clock = _Clock()
    tuner = Autotuner(clock=clock)
    assert tuner.margin == tdconv.nn.AUTOTUNE_MARGIN == 1.1
    assert tuner.fused_is_faster(clock.step(fused_s), clock.step(1.0)) is keeps_fused
    assert tuner.timings == 1


def test_choices_are_remembered_per_configuration():
    clock = _Clock()
    tuner = Autotuner(clock=clock)
    assert tuner.picks_fused("a", clock.step(2.0), clock.step(1.0)) is False
    assert tuner.picks_fused("a", clock.step(0.1), clock.step(1.0)) is False  # remembered, not timed again
    assert tuner.timings == 1
    assert tuner.picks_fused("b", clock.step(0.1), clock.step(1.0)) is True
    assert tuner.timings == 2
    tuner.set_enabled(False)  # off: the fused op, no timing, the choices forgotten
    assert tuner.picks_fused("a", clock.step(2.0), clock.step(1.0)) is True and tuner.timings == 2
    assert tuner.choices == {}
    with pytest.raises(TypeError, match="enabled must be a bool"):
        tuner.set_enabled(1)


def test_layer_times_once_per_input_shape_and_not_under_autograd(require_ext, monkeypatch):
    layer = tdconv.FactorizedConv2d(8, 8, 3, padding=1, method="cp", rank=4)
    calls = []
    monkeypatch.setattr(autotuner, "fused_is_faster", lambda fused, unfused, device=None: calls.append(1) or False)
    monkeypatch.setattr(autotuner, "choices", {})
    x = torch.randn(2, 8, 6, 6)
    with tdconv.autotuning(True), torch.no_grad():
        expected = layer.to_chain()(x)
        torch.testing.assert_close(layer(x), expected)  # timed: the chain "won"
        layer(x)
        assert len(calls) == 1
        layer(torch.randn(3, 8, 6, 6))
        assert len(calls) == 2  # a new input shape is timed again
    # Under autograd auto takes the chain without timing (the fused op's backward recomputes it).
    y = layer(torch.randn(4, 8, 6, 6))
    y.sum().backward()
    assert len(calls) == 2 and layer.first.grad is not None


def test_autotuning_restores_the_previous_setting_even_on_errors():
    before = autotuner.enabled
    try:
        tdconv.set_autotune(True)
        autotuner.choices["kept"] = True
        with pytest.raises(RuntimeError, match="inside"):
            with tdconv.autotuning(False):
                assert autotuner.enabled is False and "kept" not in autotuner.choices
                raise RuntimeError("inside")
        assert autotuner.enabled is True and autotuner.choices.get("kept") is True
        with tdconv.autotuning(False):
            with tdconv.autotuning(True):
                assert autotuner.enabled is True
            assert autotuner.enabled is False
        with pytest.raises(TypeError, match="enabled must be a bool"):
            with tdconv.autotuning("no"):
                pass
    finally:
        autotuner.choices.pop("kept", None)
        tdconv.set_autotune(before)


def test_no_timing_under_tracers(require_ext, monkeypatch):
    # torch.jit.trace runs forward twice and compares the graphs: a stopwatch inside would make them differ.
    # (Its sanity check also runs the model eagerly, outside the tracer, where timing is allowed.)
    calls = []
    monkeypatch.setattr(autotuner, "fused_is_faster",
                        lambda *a, **k: calls.append(tdconv.utils.is_tracing()) or False)
    monkeypatch.setattr(autotuner, "choices", {})
    torch.manual_seed(0)
    model = nn.Sequential(tdconv.FactorizedConv2d(8, 8, 3, padding=1, method="cp", rank=4), nn.ReLU(),
                          tdconv.FactorizedConv2d(8, 8, 3, padding=1, method="tucker", rank=4)).eval()
    x = torch.randn(2, 8, 6, 6)
    with tdconv.autotuning(True), torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        assert True not in calls
        graph = str(traced.inlined_graph)
        assert "tdconv::cp_conv2d" in graph and "tdconv::tucker_conv2d" in graph  # deterministic: the fused ops
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)


def test_auto_skips_unvalidated_kernels(require_ext, monkeypatch):
    # A kernel that has not run on hardware is used only when asked for explicitly.
    monkeypatch.setattr(tdconv.ops, "UNVALIDATED_KERNELS", {("cp_conv2d", "cpu")})
    layer = tdconv.FactorizedConv2d(4, 6, 3, padding=1, method="cp", rank=2)
    x = torch.randn(1, 4, 5, 5)
    assert any("not been validated" in r for r in layer.fused_unsupported_reasons(x))
    layer.implementation = "fused"
    assert layer.fused_unsupported_reasons(x) == []
