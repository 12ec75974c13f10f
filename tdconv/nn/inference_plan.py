"""The prepared eval-mode call of a factorised layer (:meth:`FactorizedConv2d.prepare_for_inference`).

An ordinary call re-derives on every call what does not change between calls: the factors reshaped as
the op takes them, its argument lists, the dispatch decision and the output layout. At batch 1 that
costs about as much as a small layer's op. A plan keeps them, and is checked against the layer on
every call (the identity and version of each parameter, the implementation and the fused ReLU), so
that an in-place update of a parameter (``load_state_dict``, BatchNorm folding) rebuilds it instead of
computing with stale factors. It takes only plain descriptions of the layer (its parameters and
arguments), never the class.
"""
from __future__ import annotations

import torch

from ..utils import is_tracing
from . import dispatch

__all__ = ["InferencePlan"]


class InferencePlan:
    """What an eval-mode call of the fused op needs, kept ready. Calling it returns the layer's output,
    or None where the ordinary path must run instead (training mode, gradients, tracers, another
    device or dtype, an input the layer rejects, or an input for which the layer runs its chain)."""

    def __init__(self, layer=None, prepack: bool = False):
        self.prepack = prepack
        self._check = None  # what the plan was built from; None: build on the next call
        self.choices: dict = {}  # (shape, strides, threads) -> whether the fused op computes it
        if layer is not None:
            self._build(layer)

    # A copy (deepcopy, pickling) rebuilds itself against the copied layer on its first call.
    def __deepcopy__(self, memo):
        return InferencePlan(prepack=self.prepack)

    def __reduce__(self):
        return InferencePlan, (None, self.prepack)

    @staticmethod
    def _signature(layer) -> tuple:
        params = layer._params()
        return (tuple(p for p in params),
                tuple((p._version, p.data_ptr(), p.dtype, p.device) if p is not None else None for p in params),
                layer.implementation, layer.fused_relu)

    def _matches(self, layer) -> bool:
        """The layer still has the parameters the plan was built from: the same objects, not modified in
        place (version), not given new data (``param.data = ...``, ``.to()``, ``.float()``)."""
        params, states, implementation, relu = self._check
        for p, q, state in zip(layer._params(), params, states):
            if p is not q or (p is not None and (p._version, p.data_ptr(), p.dtype, p.device) != state):
                return False
        return layer.implementation == implementation and layer.fused_relu == relu

    def _build(self, layer) -> None:
        first, spatial, last, bias, spatial_w = (p.detach() if p is not None else None for p in layer._params())
        g = layer.geometry
        self.op = getattr(torch.ops.tdconv, dispatch.fused_op_name(layer.method)).default
        # Views of the parameters only, unless prepacked: an edit through ``.data`` (which no version
        # counter sees) then still reaches the call. cp4's product filter is formed per call.
        self.cp4 = (spatial[:, 0], spatial_w[:, 0]) if layer.method == "cp4" else None
        s = spatial if layer.method == "tucker" else spatial[:, 0]
        padding = g.symmetric_padding
        self.args = (first.flatten(1), s, last.flatten(1), bias, [int(v) for v in g.stride],
                     [int(v) for v in padding] if padding is not None else None, [int(v) for v in g.dilation],
                     bool(layer.fused_relu))
        self.packed = None
        if self.prepack and first.device.type == "cpu" and padding is not None and not layer.fused_unsupported_reasons(
                first.new_empty(1, layer.in_channels, 1, 1)):
            tucker = layer.method == "tucker"
            if self.cp4 is not None:
                self.args = (self.args[0], self.cp4[0] * self.cp4[1]) + self.args[2:]
                self.cp4 = None
            fp, cp, lp, bp = torch.ops.tdconv.pack_factors(self.args[0], self.args[1], self.args[2], bias, tucker)
            self.op = torch.ops.tdconv.factorized_conv2d_prepacked.default
            self.packed = (tucker, fp, cp if tucker else None, lp, bp if bias is not None else None)
        self.device, self.dtype, self.in_channels = first.device, first.dtype, layer.in_channels
        self.requires_grad = any(p is not None and p.requires_grad for p in layer._params())
        self.weights_channels_last = dispatch._weights_channels_last((layer.first, layer.spatial, layer.last))
        self.choices = {}
        self._check = self._signature(layer)

    def _decide(self, layer, x: torch.Tensor) -> bool:
        """Whether the layer computes ``x`` with its fused op (the ordinary path's decision)."""
        if layer.fused_unsupported_reasons(x) or layer.implementation == "unfused":
            return False
        return layer.implementation == "fused" or layer._auto_picks_fused(x, layer._state()[0])

    def __call__(self, layer, x):
        if is_tracing():  # tracers and exporters see the ordinary path (and must not record a rebuild)
            return None
        if self._check is None or not self._matches(layer):
            self._build(layer)
        if (type(x) is not torch.Tensor or x.dim() != 4 or x.shape[1] != self.in_channels or x.device != self.device
                or x.dtype != self.dtype or self.args[5] is None):
            return None
        if torch.is_grad_enabled() and (self.requires_grad or x.requires_grad):
            return None
        key = (x.shape, x.stride(), torch.get_num_threads())
        fused = self.choices.get(key)
        if fused is None:
            if len(self.choices) > 256:
                self.choices.clear()
            fused = self.choices[key] = self._decide(layer, x)
        if not fused:
            return None
        with torch._C._AutoDispatchBelowAutograd():
            if self.packed is not None:
                y = self.op(x, *self.args, *self.packed)
            elif self.cp4 is not None:
                a = self.args
                y = self.op(x, a[0], self.cp4[0] * self.cp4[1], *a[2:])
            else:
                y = self.op(x, *self.args)
        if self.weights_channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        return y
