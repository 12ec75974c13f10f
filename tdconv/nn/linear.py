"""``FactorizedLinear``: a linear layer whose weight is kept as a rank-R product (truncated SVD).

``W[out, in] ~ last @ first`` with ``first`` [R, in] and ``last`` [out, R]: the layer computes
``F.linear(F.linear(x, first), last, bias)``, two matrix products of ``R (in + out)`` multiply-adds per
row instead of ``in * out``. It pays where ``R < in * out / (in + out)``; :func:`tdconv.compress` leaves
a layer dense where it would not. Two matrix products are what a fused op would compute too, so there
is no fused path: the layer runs the two ``F.linear`` calls, which every counter (ptflops' functional
counting, ``FlopCounterMode``) and exporter (ONNX, ``torch.export``) already knows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..decomposition import CPTensor, decompose_kernel
from ..geometry import ConvGeometry
from ..ranks import layer_cost, positive_int, resolve_rank
from .mapping import factors_from_cp

__all__ = ["FactorizedLinear"]


class FactorizedLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` with ``W = last @ first`` of rank ``rank``; the semantics of
    ``nn.Linear`` (any leading dimensions).

    Parameters
    ----------
    in_features, out_features : int
    rank : int or float
        The rank R (at most ``min(in_features, out_features)``) or a fraction of that (default 0.5).
    bias : bool

    Attributes (``nn.Parameter``): ``first`` [R, in], ``last`` [out, R], ``bias`` [out] or None.

    Examples
    --------
    >>> import torch, tdconv
    >>> fc = torch.nn.Linear(512, 256)
    >>> f = tdconv.FactorizedLinear.from_linear(fc, rank=64)
    >>> f
    FactorizedLinear(in_features=512, out_features=256, rank=64)
    >>> f(torch.randn(3, 512)).shape
    torch.Size([3, 256])
    """

    method = "svd"

    def __init__(self, in_features, out_features, rank=0.5, bias=True, *, device=None, dtype=None):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.rank = resolve_rank(rank, "svd", self.out_features, self.in_features)
        kw = {"device": device, "dtype": dtype}
        self.first = nn.Parameter(torch.empty(self.rank, self.in_features, **kw))
        self.last = nn.Parameter(torch.empty(self.out_features, self.rank, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random factors whose product has the variance of ``nn.Linear``'s default weight init."""
        target = 1.0 / (3.0 * self.in_features)
        std = (target / self.rank) ** 0.25
        with torch.no_grad():
            self.first.normal_(0.0, std)
            self.last.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    # ------------------------------------------------------------------------------------------ conversions
    @classmethod
    def from_linear(cls, linear: nn.Linear, rank=0.5, *, bias: bool | None = None, **options) -> "FactorizedLinear":
        """The truncated SVD of ``linear``'s weight at ``rank`` (each singular value split equally over
        the two factors), with its bias. ``bias=True`` gives the layer a (zero) bias where ``linear`` has
        none. ``options`` are accepted for symmetry with :meth:`FactorizedConv2d.from_conv` and unused."""
        layer = cls._like_checked(linear, rank, bias)
        return layer.load_decomposition(decompose_kernel(linear.weight.detach(), "svd", layer.rank), linear.bias)

    @classmethod
    def from_decomposition(cls, linear: nn.Linear, method: str, decomposition, *, bias: bool | None = None,
                           **_ignored) -> "FactorizedLinear":
        """The layer made of ``decomposition`` (a :class:`CPTensor` of order 2 of ``linear``'s weight, as
        :func:`tdconv.decomposition.decompose_kernel` returns it for ``"svd"``), with ``linear``'s bias."""
        if method != "svd":
            raise ValueError(f"a linear layer is factorised by 'svd', not {method!r}")
        if not isinstance(decomposition, CPTensor):
            raise TypeError(f"a linear layer is made of a CPTensor, got {type(decomposition).__name__}")
        return cls._like_checked(linear, decomposition.rank, bias).load_decomposition(decomposition, linear.bias)

    @classmethod
    def _like_checked(cls, linear, rank, bias):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if bias not in (None, True, False):
            raise ValueError(f"bias must be None (keep the layer's), True or False, got {bias!r}")
        if bias is False and linear.bias is not None:
            raise ValueError("bias=False would drop the layer's bias and change its function; use bias=None")
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, linear.bias is not None or bias is True,
                   device=w.device, dtype=w.dtype)

    def load_decomposition(self, decomposition, bias: torch.Tensor | None = None) -> "FactorizedLinear":
        """Set the factors from an order-2 CP decomposition (an SVD) of the weight, of this layer's
        rank, and ``bias`` (zero when None); returns self."""
        if not isinstance(decomposition, CPTensor) or tuple(decomposition.shape) != (self.out_features,
                                                                                     self.in_features):
            raise ValueError(f"the decomposition must be a CPTensor of a [{self.out_features}, {self.in_features}] "
                             f"matrix, got {type(decomposition).__name__} of shape "
                             f"{tuple(getattr(decomposition, 'shape', ()))}")
        if decomposition.rank != self.rank:
            raise ValueError(f"the decomposition has rank {decomposition.rank}, this layer {self.rank}")
        if bias is not None and (self.bias is None or tuple(bias.shape) != (self.out_features,)):
            raise ValueError(f"bias must be [{self.out_features}] for a layer with a bias, got {tuple(bias.shape)}"
                             + (" for a layer without one" if self.bias is None else ""))
        factors = factors_from_cp(decomposition, "svd", (self.out_features, self.in_features, 1, 1))
        with torch.no_grad():
            self.first.copy_(factors["first"].flatten(1))
            self.last.copy_(factors["last"].flatten(1))
            if self.bias is not None:
                self.bias.copy_(bias.detach()) if bias is not None else self.bias.zero_()
        return self

    def spec(self) -> dict:
        """The constructor arguments that rebuild this layer (plain values, for saving)."""
        return {"kind": "linear", "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    def weight_matrix(self) -> torch.Tensor:
        """The dense weight ``[out, in]`` this layer computes with."""
        return self.last @ self.first

    def kernel(self) -> torch.Tensor:
        """The dense weight (the name the factorised conv's reconstruction has)."""
        return self.weight_matrix()

    def to_linear(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear``."""
        w = self.first
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_matrix())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.train(self.training)

    def to_chain(self) -> nn.Sequential:
        """The same function as two standard ``nn.Linear`` layers (copies of the factors)."""
        w = self.first
        kw = {"device": w.device, "dtype": w.dtype}
        a = nn.Linear(self.in_features, self.rank, bias=False, **kw)
        b = nn.Linear(self.rank, self.out_features, bias=self.bias is not None, **kw)
        with torch.no_grad():
            a.weight.copy_(self.first)
            b.weight.copy_(self.last)
            if self.bias is not None:
                b.bias.copy_(self.bias)
        return nn.Sequential(a, b).train(self.training)

    def chain_factors(self) -> list:
        return [self.first, self.last]

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and (x.dim() < 1 or x.shape[-1] != self.in_features):
            raise ValueError(f"FactorizedLinear expects inputs [..., {self.in_features}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return F.linear(F.linear(x, self.first), self.last, self.bias)

    # ------------------------------------------------------------------------------------------ cost
    @property
    def geometry(self) -> ConvGeometry:
        """The layer as the 1x1 convolution it is priced as (see :func:`tdconv.ranks.layer_cost`)."""
        return ConvGeometry.of(self)

    def num_params(self, rank=None) -> int:
        """Parameters of this layer, or of the same layer at another ``rank``."""
        return layer_cost(self.geometry, "svd", self.rank if rank is None else rank, "params")

    def macs(self, rows: int = 1, rank=None) -> int:
        """Multiply-accumulates of ``rows`` input rows (the product of the input's leading dimensions
        but the batch's, 1 for ``[N, in]``), bias included, as ptflops counts two ``nn.Linear``."""
        return layer_cost(self.geometry, "svd", self.rank if rank is None else rank, "macs", (int(rows), 1))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
                + (", bias=False" if self.bias is None else ""))
