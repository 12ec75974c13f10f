"""How a factorised layer computes: why the fused op cannot run (reasons), the fused and the unfused
paths, and the layout of the result.

Everything here takes a plain description of the layer (:class:`~tdconv.geometry.ConvGeometry`, the
method, the rank and the parameter tensors), never the layer class. Both paths return the memory
format ``nn.Conv2d`` would for the same input (channels_last when the input is channels_last,
contiguous otherwise), so that code after the layer never depends on which path ran.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from .. import ops as _ops
from ..geometry import ConvGeometry
from ..utils import is_tracing
from .live_taps import live_conv2d

__all__ = ["IMPLEMENTATIONS", "fused_op_name", "layer_unsupported_reasons", "fused_unsupported_reasons",
           "conv_memory_format", "fused_forward", "unfused_forward"]

IMPLEMENTATIONS = ("auto", "fused", "unfused")


def fused_op_name(method: str) -> str:
    return "tucker_conv2d" if method == "tucker" else "cp_conv2d"


def layer_unsupported_reasons(geometry: ConvGeometry, method: str | None = None) -> list:
    """Why no fused op can compute a layer of this geometry (and ``method``), whatever the input (empty
    when one can)."""
    reasons = []
    if method == "svd":
        reasons.append("an SVD layer is two 1x1 convolutions (two matrix products), which a fused op would not "
                       "make cheaper; it runs them")
    if geometry.groups != 1:
        reasons.append(f"the fused ops compute ungrouped layers; a grouped layer (groups={geometry.groups}) runs "
                       "its chain of grouped convolutions")
    if geometry.padding_mode != "zeros":
        reasons.append(f"the fused op pads with zeros only, not padding_mode={geometry.padding_mode!r}")
    if geometry.symmetric_padding is None:
        reasons.append("padding='same' with an even dilated kernel pads asymmetrically; the fused op pads "
                       "symmetrically")
    return reasons


def fused_unsupported_reasons(geometry: ConvGeometry, method: str, x: torch.Tensor, factor: torch.Tensor,
                              explicit: bool) -> list:
    """Why the fused op cannot compute the layer on the input ``x`` with parameters like ``factor``
    (empty when it can). ``explicit=False`` is the question of ``implementation="auto"``: a kernel that
    has not run on hardware yet counts as a reason too."""
    reasons = layer_unsupported_reasons(geometry, method)
    if method == "svd":
        return reasons
    return reasons + _ops.fused_unsupported_reasons(x, factor, fused_op_name(method), explicit=explicit)


def _strides_like_channels_last(t: torch.Tensor) -> bool:
    """Whether the strides of the 4-D ``t`` run in channels_last order (C innermost, then W, H, N), as
    ``suggest_memory_format`` decides; size-1 dimensions do not count."""
    if torch.compiler.is_compiling():  # symbolic sizes: torch's own rule handles them
        return suggest_memory_format(t) == torch.channels_last
    sizes, strides = [int(v) for v in t.shape], t.stride()  # (the jit tracer hands sizes out as tensors)
    if t.dim() != 4 or strides[1] == 0:
        return False
    lowest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lowest or (d == 0 and lowest == strides[1]):
            return False
        lowest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def _suggests_channels_last(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    return _strides_like_channels_last(t)  # strided views: by the order of the strides


_WEIGHTS_CHANNELS_LAST: dict = {}


def _weights_channels_last(weights) -> bool:
    """Whether a 4-D weight is in channels_last (as after ``model.to(memory_format=torch.channels_last)``),
    by the order of its strides: the factors' 1x1 and depthwise shapes are contiguous in both formats,
    so only the strides tell. Remembered per shape and strides (asked on every call)."""
    if is_tracing():
        return any(w.dim() == 4 and _strides_like_channels_last(w) for w in weights)
    key = tuple((tuple(w.shape), w.stride()) for w in weights)
    hit = _WEIGHTS_CHANNELS_LAST.get(key)
    if hit is None:
        if len(_WEIGHTS_CHANNELS_LAST) > 4096:
            _WEIGHTS_CHANNELS_LAST.clear()
        hit = _WEIGHTS_CHANNELS_LAST[key] = any(w.dim() == 4 and _strides_like_channels_last(w) for w in weights)
    return hit


def conv_memory_format(x: torch.Tensor, *weights: torch.Tensor) -> torch.memory_format:
    """The memory format ``nn.Conv2d`` gives its output for the input ``x`` and kernel(s) ``weights``:
    channels_last when the input or a 4-D weight suggests it, contiguous otherwise."""
    if _suggests_channels_last(x) or _weights_channels_last(weights):
        return torch.channels_last
    return torch.contiguous_format


def fused_forward(geometry: ConvGeometry, method: str, x, first, spatial, last, bias, spatial_w=None,
                  relu: bool = False):
    """The layer by one fused op (then a ReLU where ``relu``, fused into the op), in the layout
    ``nn.Conv2d`` would return. The op returns its input's layout (NCHW or channels_last), which is that
    layout except where the weights alone are channels_last."""
    conv = (geometry.stride, geometry.symmetric_padding, geometry.dilation)
    if method == "tucker":
        y = _ops.tucker_conv2d(x, first.flatten(1), spatial, last.flatten(1), bias, *conv, relu)
    else:
        s = spatial[:, 0]
        if method == "cp4":
            s = s * spatial_w[:, 0]  # [R, kh, 1] * [R, 1, kw]: the same function as the two 1-D filters
        y = _ops.cp_conv2d(x, first.flatten(1), s, last.flatten(1), bias, *conv, relu)
    return y.contiguous(memory_format=conv_memory_format(x, first, spatial, last))


def unfused_forward(geometry: ConvGeometry, method: str, rank, x, first, spatial, last, bias, spatial_w=None,
                    skip_padding_taps: bool = False, relu: bool = False):
    """The layer as its chain of standard convolutions (``to_chain``; then a ReLU where ``relu``), in
    the layout ``nn.Conv2d`` would return."""
    fmt = conv_memory_format(x, *(w for w in (first, spatial, last) if w is not None))
    pad = geometry.explicit_pad
    padding = geometry.symmetric_padding if pad is None else (0, 0)
    mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
    groups = geometry.groups
    if method == "svd":  # the first 1x1 carries the stride, padding and dilation
        if pad is not None:
            x = F.pad(x, pad, mode=mode)
        y = F.conv2d(x, first, None, geometry.stride, padding, geometry.dilation, groups)
        y = F.conv2d(y, last, bias, 1, 0, 1, groups)
        if relu:
            y = torch.relu(y)
        return y.contiguous(memory_format=fmt)
    y = F.conv2d(x, first, None, 1, 0, 1, groups)
    if pad is not None:
        y = F.pad(y, pad, mode=mode)
    conv = live_conv2d if pad is None and skip_padding_taps else F.conv2d
    if method == "tucker":
        y = conv(y, spatial, None, geometry.stride, padding, geometry.dilation, groups)
    elif method == "cp":
        y = conv(y, spatial, None, geometry.stride, padding, geometry.dilation, rank)
    else:
        (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
        y = F.conv2d(y, spatial, None, (sh, 1), (padding[0], 0), (dh, 1), groups=rank)
        y = F.conv2d(y, spatial_w, None, (1, sw), (0, padding[1]), (1, dw), groups=rank)
    y = F.conv2d(y, last, bias, 1, 0, 1, groups)
    if relu:  # (torch.relu, not F.relu: ptflops' functional counting wraps F.relu, and counts the layer itself)
        y = torch.relu(y)
    return y.contiguous(memory_format=fmt)
