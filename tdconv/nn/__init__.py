"""Factorised layers, split by job.

- :mod:`~tdconv.nn.conv`: :class:`FactorizedConv2d` (constructor, parameters, ``from_conv`` / ``to_conv`` /
  ``to_chain`` / ``kernel``, cost);
- :mod:`~tdconv.nn.linear`: :class:`FactorizedLinear` (a linear layer's truncated SVD);
- :mod:`~tdconv.nn.mapping`: the factor <-> layer mapping, as plain functions;
- :mod:`~tdconv.nn.dispatch`: why the fused op cannot run, the fused and unfused paths, the output layout;
- :mod:`~tdconv.nn.autotune`: the choice of ``implementation="auto"`` (:func:`set_autotune`,
  :func:`autotuning`);
- :mod:`~tdconv.nn.live_taps`: :func:`skip_padding_taps` and :class:`LiveTapConv2d`.
"""
from ..ranks import METHODS, resolve_rank
from .autotune import AUTOTUNE_MARGIN, Autotuner, autotuner, autotuning, set_autotune
from .conv import PADDING_MODES, FactorizedConv2d
from .linear import FactorizedLinear
from .dispatch import IMPLEMENTATIONS
from .live_taps import LiveTapConv2d, skip_padding_taps

__all__ = ["FactorizedConv2d", "FactorizedLinear", "LiveTapConv2d", "resolve_rank", "set_autotune", "autotuning", "autotuner",
           "Autotuner", "skip_padding_taps", "AUTOTUNE_MARGIN", "METHODS", "PADDING_MODES", "IMPLEMENTATIONS"]
