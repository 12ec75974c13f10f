"""The prepared eval-mode call of a factorised layer (:meth:`FactorizedConv2d.prepare_for_inference`).

An ordinary call re-derives on every call what does not change between calls: the factors reshaped as
the op takes them, its argument lists, the dispatch decision and the output layout. At batch 1 that
costs about as much as a small layer's op. A plan keeps them, and is checked against the layer on
every call (the layer's configuration; the identity, version, storage and ``requires_grad`` of each
parameter), so that an in-place update of a parameter (``load_state_dict``, BatchNorm folding), a
conversion (``.to()``, ``.float()``) or a change of the layer's arguments rebuilds it instead of
computing with stale factors. It takes only plain descriptions of the layer (its parameters and
arguments), never the class.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _ext
from ..ops import output_memory_format
from ..utils import is_tracing
from . import dispatch
from .autotune import autotuner

__all__ = ["InferencePlan"]


def _param_state(p):
    if p is None:
        return None
    # Tensors made under torch.inference_mode() have no version counter (and cannot be changed in place
    # outside it): their storage identifies them.
    return (None if p.is_inference() else p._version, p.data_ptr(), p.requires_grad)


class _Prepared(NamedTuple):
    check: tuple        # (configuration, parameters, their states): what it was built from
    op: object          # the op overload to call
    args: tuple         # its arguments after x
    cp4: tuple | None   # cp4 unpacked: the two 1-D filters whose product is formed per call
    device: torch.device
    dtype: torch.dtype
    in_channels: int
    requires_grad: bool


class InferencePlan:
    """What an eval-mode call of the fused op needs, kept ready. Calling it returns the layer's output,
    or None where the ordinary path must run instead (training mode, gradients, tracers, another
    device or dtype, an input the layer rejects, or an input for which the layer runs its chain).

    ``prepack`` (CPU): the factors packed once (``tdconv::pack_factors``). The packs are copies: an edit
    of a parameter through ``.data`` (no version counter sees it) is not followed, and since calls
    below 256 output pixels read the 1x1 factors in place, such an edit would then show at small
    batches only. Call :meth:`FactorizedConv2d.prepare_for_inference` again after one."""

    def __init__(self, layer=None, prepack: bool = False):
        self.prepack = prepack
        self._p: _Prepared | None = None  # published in one assignment (calls may run in several threads)
        self.choices: dict = {}  # (shape, strides, threads, autotune on) -> (fused?, memory format or None)
        if layer is not None:
            self._p = self._build(layer)

    # A copy (deepcopy, pickling) rebuilds itself against the copied layer on its first call.
    def __deepcopy__(self, memo):
        return InferencePlan(prepack=self.prepack)

    def __reduce__(self):
        return InferencePlan, (None, self.prepack)

    @staticmethod
    def _check_of(layer) -> tuple:
        params = layer._params()
        return (layer._state()[0], params, tuple(_param_state(p) for p in params))

    @staticmethod
    def _matches(p: _Prepared, layer) -> bool:
        config, params, states = p.check
        if layer._state()[0] != config:
            return False
        for q, old, state in zip(layer._params(), params, states):
            if q is not old or _param_state(q) != state:
                return False
        return True

    def _build(self, layer) -> _Prepared:
        check = self._check_of(layer)
        if layer.fused_unsupported_reasons():  # (SVD and grouped layers) nothing to prepare: the chain runs
            return _Prepared(check, None, (), None, layer.first.device, layer.first.dtype, layer.in_channels, False)
        first, spatial, last, bias, spatial_w = (p.detach() if p is not None else None for p in layer._params())
        g = layer.geometry
        # Without the compiled extension there is no op to call: the ordinary path (and its fallback).
        op = getattr(torch.ops.tdconv, dispatch.fused_op_name(layer.method)).default if _ext.has_ext() else None
        # Views of the parameters only, unless prepacked: an edit through ``.data`` (which no version
        # counter sees) then still reaches the call. cp4's product filter is formed per call.
        cp4 = (spatial[:, 0], spatial_w[:, 0]) if layer.method == "cp4" else None
        s = spatial if layer.method == "tucker" else spatial[:, 0]
        padding = g.symmetric_padding
        args = (first.flatten(1), s, last.flatten(1), bias, [int(v) for v in g.stride],
                [int(v) for v in padding] if padding is not None else None, [int(v) for v in g.dilation],
                bool(layer.fused_relu))
        probe = first.new_empty(1, layer.in_channels, 1, 1)  # (the layer's reasons for an input like it)
        if op is not None and self.prepack and first.device.type == "cpu" and padding is not None \
                and not layer.fused_unsupported_reasons(probe):
            tucker = layer.method == "tucker"
            if cp4 is not None:
                args, cp4 = (args[0], cp4[0] * cp4[1]) + args[2:], None
            fp, cp, lp, bp = torch.ops.tdconv.pack_factors(args[0], args[1], args[2], bias, tucker)
            op = torch.ops.tdconv.factorized_conv2d_prepacked.default
            args = args + (tucker, fp, cp if tucker else None, lp, bp if bias is not None else None)
        return _Prepared(check, op, args, cp4, first.device, first.dtype, layer.in_channels,
                         any(p is not None and p.requires_grad for p in layer._params()))

    def _decide(self, layer, x: torch.Tensor):
        """``(fused, memory format)``: whether the layer computes ``x`` with its fused op (the ordinary
        path's decision), and the format ``nn.Conv2d`` would return (None where the op's own is it)."""
        if layer.fused_unsupported_reasons(x) or layer.implementation == "unfused":
            return False, None
        fused = layer.implementation == "fused" or layer._auto_picks_fused(x, layer._state()[0])
        fmt = dispatch.conv_memory_format(x, layer.first, layer.spatial, layer.last)
        return fused, (fmt if fmt != output_memory_format(x) else None)

    def __call__(self, layer, x):
        if is_tracing():  # tracers and exporters see the ordinary path (and must not record a rebuild)
            return None
        p = self._p
        if p is None or not self._matches(p, layer):
            p = self._p = self._build(layer)
            self.choices = {}
        if (p.op is None or type(x) is not torch.Tensor or x.dim() != 4 or x.shape[1] != p.in_channels
                or x.device != p.device or x.dtype != p.dtype or p.args[5] is None):
            return None
        if torch.is_grad_enabled() and (p.requires_grad or x.requires_grad):
            return None
        key = (x.shape, x.stride(), torch.get_num_threads(), autotuner.enabled)
        choice = self.choices.get(key)
        if choice is None:
            choice = self._decide(layer, x)
            # A choice made while timing is off only for now (a FLOP counter is running) is not kept.
            if autotuner.active or not autotuner.enabled or layer.implementation != "auto":
                if len(self.choices) > 256:
                    self.choices.clear()
                self.choices[key] = choice
        fused, fmt = choice
        if not fused:
            return None
        with torch._C._AutoDispatchBelowAutograd():
            if p.cp4 is not None:
                a = p.args
                y = p.op(x, a[0], p.cp4[0] * p.cp4[1], *a[2:])
            else:
                y = p.op(x, *p.args)
        return y if fmt is None else y.contiguous(memory_format=fmt)
