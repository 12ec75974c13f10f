"""A plain description of a convolution's geometry, shared by the layer, its dispatch and rank pricing.

Dispatch, autotuning and the cost functions take a :class:`ConvGeometry` (channels, kernel, stride,
padding, dilation, padding mode, bias), never the layer class, so that none of them imports the layer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .utils import conv_output_size

__all__ = ["ConvGeometry"]


@dataclass(frozen=True)
class ConvGeometry:
    """What the shape of a 2-D convolution's work depends on.

    ``padding`` is a pair of ints, ``"same"`` or ``"valid"``, as ``nn.Conv2d`` keeps it.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple
    stride: tuple = (1, 1)
    padding: object = (0, 0)
    dilation: tuple = (1, 1)
    padding_mode: str = "zeros"
    bias: bool = False
    groups: int = 1

    @classmethod
    def of(cls, conv) -> "ConvGeometry":
        """The geometry of an ``nn.Conv2d`` (or anything with its attributes); of an ``nn.Linear`` (or
        anything with ``in_features`` / ``out_features``), the 1x1 conv it is priced and fitted as."""
        if hasattr(conv, "in_features"):
            return cls(int(conv.in_features), int(conv.out_features), (1, 1), bias=conv.bias is not None)
        return cls(int(conv.in_channels), int(conv.out_channels), tuple(conv.kernel_size), tuple(conv.stride),
                   conv.padding if isinstance(conv.padding, str) else tuple(conv.padding), tuple(conv.dilation),
                   conv.padding_mode, conv.bias is not None, int(getattr(conv, "groups", 1)))

    @functools.cached_property
    def pads(self) -> tuple:
        """``((top, bottom), (left, right))`` padding of the spatial conv (``"same"``: the odd pixel
        after, as ``nn.Conv2d``)."""
        if self.padding == "valid":
            return (0, 0), (0, 0)
        if self.padding == "same":
            totals = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
            return tuple((t // 2, t - t // 2) for t in totals)
        return tuple((p, p) for p in self.padding)

    @functools.cached_property
    def symmetric_padding(self):
        """The ``(ph, pw)`` padding when it is symmetric, else None."""
        (top, bottom), (left, right) = self.pads
        return (top, left) if top == bottom and left == right else None

    @functools.cached_property
    def explicit_pad(self):
        """None when the spatial conv pads by itself (zeros, symmetric); else the ``F.pad`` tuple
        ``(left, right, top, bottom)`` applied before it (other padding modes, asymmetric "same")."""
        if self.padding_mode == "zeros" and self.symmetric_padding is not None:
            return None
        (top, bottom), (left, right) = self.pads
        return (left, right, top, bottom)

    def output_size(self, hw) -> tuple:
        """``(Ho, Wo)`` for an input of spatial size ``hw``."""
        return conv_output_size(hw, self.kernel_size, self.stride, self.pads, self.dilation)
