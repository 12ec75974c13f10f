"""The choice of ``implementation="auto"``: the fused op or the chain, timed once per configuration.

The state is one :class:`Autotuner` object (:data:`autotuner`); :func:`set_autotune` switches it, and
:func:`autotuning` switches it for a ``with`` block and restores the previous setting on exit.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..utils import is_tracing, median_times

__all__ = ["AUTOTUNE_MARGIN", "Autotuner", "autotuner", "set_autotune", "autotuning"]

# ``auto`` keeps the fused op unless the chain's median time is below fused / AUTOTUNE_MARGIN: single
# timings on a shared machine vary by more than 10 %, and the fused op never allocates the two
# intermediate feature maps (in the first whole-model runs, a smaller margin lost to plain "fused" by
# picking the chain on layers where the two tie).
AUTOTUNE_MARGIN = 1.1


class Autotuner:
    """Times the fused op against the unfused chain the first time it meets a configuration (layer,
    input shape, strides, dtype, device, thread count) and remembers the faster one, like
    ``torch.backends.cudnn.benchmark``.

    Parameters
    ----------
    enabled : bool
        When off, and always under a tracer or exporter (``torch.compile``, ``torch.export``,
        ``torch.jit.trace``, ``torch.onnx.export``), :meth:`picks_fused` says True without timing: a
        deterministic choice, the fused op wherever it can run.
    margin : float
        The chain must be faster than the fused op by this factor to be chosen.
    rounds : int
        Interleaved timing rounds (after one warm-up call of each).
    clock : callable
        The stopwatch (``time.perf_counter``).
    """

    def __init__(self, enabled: bool = True, margin: float = AUTOTUNE_MARGIN, rounds: int = 5,
                 clock: Callable[[], float] = time.perf_counter):
        self.enabled = self._check(enabled)
        if not margin > 0:
            raise ValueError(f"margin must be positive, got {margin!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        self.margin = float(margin)
        self.rounds = rounds
        self.clock = clock
        self.choices: dict = {}
        self.timings = 0  # how many configurations have been timed

    @staticmethod
    def _check(enabled) -> bool:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        return enabled

    def set_enabled(self, enabled: bool) -> None:
        """Switch timing on or off; forgets the choices made so far."""
        self.enabled = self._check(enabled)
        self.choices.clear()

    @property
    def active(self) -> bool:
        """Whether a choice would be timed now: enabled, and no tracer, exporter or dispatch mode (a FLOP
        counter such as ``FlopCounterMode`` or ptflops' aten backend, which would count the timing runs)
        is running."""
        return self.enabled and not is_tracing() and _get_current_dispatch_mode() is None

    def picks_fused(self, key, fused: Callable[[], torch.Tensor], unfused: Callable[[], torch.Tensor],
                    device=None, checked: bool = False) -> bool:
        """Whether the configuration ``key`` runs the fused op: the remembered choice, or the outcome of
        timing ``fused()`` against ``unfused()`` now. ``checked``: the caller has just seen :attr:`active`."""
        if not checked and not self.active:
            return True
        choice = self.choices.get(key)
        if choice is None:
            choice = self.choices[key] = self.fused_is_faster(fused, unfused, device)
        return choice

    def fused_is_faster(self, fused, unfused, device=None) -> bool:
        """Whether the fused op's median time over interleaved rounds is within ``margin`` of the chain's."""
        with torch.no_grad():
            t = median_times({"fused": fused, "unfused": unfused}, rounds=self.rounds, warmup=1, device=device,
                             clock=self.clock)
        self.timings += 1
        return t["fused"] <= t["unfused"] * self.margin


autotuner = Autotuner()


def set_autotune(enabled: bool) -> None:
    """Whether ``implementation="auto"`` times the fused op against the unfused chain the first time it
    meets a layer configuration and input (default: on). When off, ``"auto"`` takes the fused op
    wherever it can run. ``implementation="fused"`` / ``"unfused"`` pin the choice (and the exact
    rounding of the result). See :class:`Autotuner`."""
    autotuner.set_enabled(enabled)


@contextlib.contextmanager
def autotuning(enabled: bool):
    """``with tdconv.autotuning(False): ...``: :func:`set_autotune` for the block; the previous setting
    (and the choices made under it) come back on exit, also when the block raises. When the block asks
    for the setting already in force, nothing changes, and the choices timed inside are kept."""
    autotuner._check(enabled)
    previous = autotuner.enabled
    if enabled == previous:
        yield autotuner
        return
    choices = dict(autotuner.choices)
    autotuner.set_enabled(enabled)
    try:
        yield autotuner
    finally:
        autotuner.enabled = previous
        autotuner.choices.clear()
        autotuner.choices.update(choices)
