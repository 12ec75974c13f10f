"""``FactorizedConv2d``: a convolution whose kernel is kept in CP or Tucker-2 form.

For a kernel ``W[C_out, C_in, kh, kw]`` (Lebedev et al., ICLR 2015; Kim et al., ICLR 2016):

- ``method="cp"``: CP of the order-3 kernel ``[C_out, C_in, kh*kw]`` at rank R: 1x1 conv C_in->R,
  depthwise kh x kw conv on R channels (the original stride / padding / dilation), 1x1 conv R->C_out.
- ``method="cp4"``: CP of the order-4 kernel: 1x1 conv, depthwise kh x 1, depthwise 1 x kw, 1x1 conv.
- ``method="tucker"``: Tucker-2 on the channel modes at ranks (R_out, R_in): 1x1 conv C_in->R_in,
  kh x kw core conv R_in->R_out, 1x1 conv R_out->C_out.
- ``method="svd"`` (1x1 kernels): the truncated SVD of the kernel as a matrix at rank R: 1x1 conv
  C_in->R (with the conv's stride, padding and dilation), 1x1 conv R->C_out.

A grouped convolution (``groups=G``) is factorised per group: the factors are block diagonal and run as
grouped 1x1 / grouped core convolutions (CP's depthwise stage is per component already), every group
at the same ranks (each rank a multiple of G).

``implementation="auto"`` computes the layer with a fused op (``torch.ops.tdconv.cp_conv2d`` for CP and
cp4, ``torch.ops.tdconv.tucker_conv2d`` for Tucker-2) when it can run the input and is the faster of
the two for it (:mod:`tdconv.nn.autotune`), and with the chain of convolutions otherwise; ``"fused"``
raises with the reasons when it cannot; ``"unfused"`` always takes the chain. Today the fused ops run
on the CPU with zero padding; the CUDA kernel of ``cp_conv2d`` is only used when asked for with
``"fused"`` until it has been validated on a GPU. Grouped and SVD layers always run their chain: an SVD
layer is two matrix products, which a fused op would not make cheaper, and the fused kernels compute
ungrouped layers.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..decomposition import CPTensor, TuckerTensor, decompose_kernel
from ..geometry import ConvGeometry
from ..ranks import layer_cost, positive_int, resolve_rank
from ..utils import is_tracing
from . import dispatch
from .autotune import autotuner
from .inference_plan import InferencePlan
from .live_taps import SkipsPaddingTaps
from .mapping import cp_component_norms, factors_from_cp, factors_from_groups, factors_from_tucker, kernel_from_factors

__all__ = ["FactorizedConv2d"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_PADS = {"zeros": nn.ZeroPad2d, "reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d,
         "circular": getattr(nn, "CircularPad2d", None)}


def _pair_of(value, name: str, minimum: int) -> tuple:
    pair = _pair(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum
                             for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return tuple(int(v) for v in pair)


def _check_container(method: str, decomposition) -> None:
    expected = TuckerTensor if method == "tucker" else CPTensor
    if not isinstance(decomposition, expected):
        raise TypeError(f"a {method} layer is made of a {expected.__name__}, got {type(decomposition).__name__}")


class FactorizedConv2d(SkipsPaddingTaps, nn.Module):
    """A 2-D convolution with a CP or Tucker-2 factorised kernel; the semantics of ``nn.Conv2d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, dilation : int or (int, int)
    padding : int, (int, int), "same" or "valid"
    bias : bool
    method : {"cp", "cp4", "tucker", "svd"}
    rank : int, (int, int) or float
        CP or SVD rank R, Tucker ranks (R_out, R_in), or a fraction of the channels (default 0.5); see
        :func:`tdconv.ranks.resolve_rank`.
    groups : int
        As ``nn.Conv2d``'s (keyword-only here); the ranks are then multiples of it.
    padding_mode : {"zeros", "reflect", "replicate", "circular"}
    implementation : {"auto", "fused", "unfused"}
        ``"auto"`` runs the fused op when it can run the input and the unfused chain otherwise;
        ``"fused"`` raises with the reasons when it cannot run; ``"unfused"`` always takes the chain.
        Every implementation returns the memory format ``nn.Conv2d`` would.
    fused_relu : bool
        A ReLU after the convolution, computed inside it (the fused op applies it to its last stage):
        what :func:`tdconv.optimize_for_inference` sets where a ReLU follows the layer.

    Attributes (``nn.Parameter``)
    -----------------------------
    first : [R or R_in, C_in / G, 1, 1]  1x1 conv into the factor space
    spatial : cp [R, 1, kh, kw]; cp4 ([R, 1, kh, 1], [R, 1, 1, kw]) as ``spatial`` and ``spatial_w``;
              tucker: the core [R_out, R_in / G, kh, kw]; svd: None
    last : [C_out, (R or R_out) / G, 1, 1]  1x1 conv back to the output channels
    bias : [C_out] or None

    Examples
    --------
    >>> import torch, tdconv
    >>> conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    >>> f = tdconv.FactorizedConv2d.from_conv(conv, method="tucker", rank=0.5)
    >>> f
    FactorizedConv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), method=tucker, rank=(32, 32))
    >>> f(torch.randn(2, 64, 8, 8)).shape
    torch.Size([2, 64, 8, 8])
    """

    # (Class defaults too: a layer pickled whole before the attributes existed loads without them.)
    fused_relu: bool = False
    groups: int = 1

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True, *,
                 method="cp", rank=0.5, groups=1, padding_mode="zeros", implementation="auto", fused_relu=False,
                 device=None, dtype=None):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = _pair_of(kernel_size, "kernel_size", 1)
        self.stride = _pair_of(stride, "stride", 1)
        self.dilation = _pair_of(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
            self.padding = padding
        else:
            self.padding = _pair_of(padding, "padding", 0)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if implementation not in dispatch.IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {dispatch.IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation
        if not isinstance(fused_relu, bool):
            raise TypeError(f"fused_relu must be a bool, got {type(fused_relu).__name__}")
        self.fused_relu = fused_relu
        self.groups = positive_int(groups, "groups")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels ({self.in_channels}) and out_channels "
                             f"({self.out_channels})")
        if method == "svd" and self.kernel_size != (1, 1):
            raise ValueError(f"method='svd' factorises 1x1 convolutions, got kernel_size={self.kernel_size}; use "
                             "'tucker' or 'cp' for a spatial kernel")
        self.method = method
        self.rank = resolve_rank(rank, method, self.out_channels, self.in_channels, self.groups)
        bias = bool(bias)  # as nn.Conv2d: any truth value
        kw = {"device": device, "dtype": dtype}
        kh, kwd = self.kernel_size
        r_mid, r_in = self._rank_pair()
        g = self.groups
        self.first = nn.Parameter(torch.empty(r_in, self.in_channels // g, 1, 1, **kw))
        if method == "cp":
            self.spatial = nn.Parameter(torch.empty(self.rank, 1, kh, kwd, **kw))
        elif method == "cp4":
            self.spatial = nn.Parameter(torch.empty(self.rank, 1, kh, 1, **kw))
            self.spatial_w = nn.Parameter(torch.empty(self.rank, 1, 1, kwd, **kw))
        elif method == "svd":
            self.register_parameter("spatial", None)
        else:
            self.spatial = nn.Parameter(torch.empty(r_mid, r_in // g, kh, kwd, **kw))
        self.last = nn.Parameter(torch.empty(self.out_channels, r_mid // g, 1, 1, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **kw)) if bias else None
        if implementation == "fused" and self.fused_unsupported_reasons():
            raise ValueError("implementation='fused' cannot run: " + "; ".join(self.fused_unsupported_reasons()))
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ init
    def _factors(self) -> list:
        return [f for f in (self.first, self.spatial, self.last) if f is not None] + (
            [self.spatial_w] if self.method == "cp4" else [])

    def chain_factors(self) -> list:
        """The factors in the order of :meth:`to_chain`'s convolutions."""
        return [f for f in (self.first, self.spatial, getattr(self, "spatial_w", None), self.last) if f is not None]

    def reset_parameters(self) -> None:
        """Random factors whose product has the variance of ``nn.Conv2d``'s default kernel init."""
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        target = 1.0 / (3.0 * fan_in)  # variance of U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        with torch.no_grad():
            factors = self._factors()
            # A kernel entry sums `terms` products of one entry of each factor (within its group).
            g = self.groups
            terms = self.rank // g if self.method != "tucker" else (self.rank[0] // g) * (self.rank[1] // g)
            std = (target / terms) ** (1.0 / (2 * len(factors)))
            for f in factors:
                f.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)

    # ------------------------------------------------------------------------------------------ conversions
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, method: str = "cp", rank=0.5, *, implementation: str = "auto",
                  bias: bool | None = None, seed: int | None = None, **decomposition_options) -> "FactorizedConv2d":
        """Decompose ``conv``'s kernel with the engine (:func:`tdconv.decomposition.decompose_kernel`) and
        keep its bias.

        ``seed`` and ``decomposition_options`` go to :func:`tdconv.cp_als` (cp, cp4) or
        :func:`tdconv.tucker_hooi` (tucker, which is deterministic and ignores ``seed``). The same
        defaults as the constructor. Each CP component's norm is spread equally over its factors.
        ``bias``: None keeps the conv's (or its lack of one); True gives the layer a bias even where
        the conv has none, initialised to zero (the function is unchanged).
        """
        layer = cls._like_checked(conv, method, rank, bias, implementation)
        decomposition = decompose_kernel(conv.weight.detach(), method, layer.rank, groups=layer.groups, seed=seed,
                                         **decomposition_options)
        return layer.load_decomposition(decomposition, conv.bias)

    @classmethod
    def from_decomposition(cls, conv: nn.Conv2d, method: str, decomposition, *, implementation: str = "auto",
                           bias: bool | None = None) -> "FactorizedConv2d":
        """The layer of ``conv``'s arguments made of ``decomposition`` (of its kernel, as
        :func:`tdconv.decomposition.decompose_kernel` returns it for ``method``: for a grouped conv, a
        list with one decomposition per group), with ``conv``'s bias."""
        parts = decomposition if isinstance(decomposition, (list, tuple)) else [decomposition]
        if not parts:
            raise ValueError("decomposition is an empty list")
        for part in parts:
            _check_container(method, part)
        first = parts[0]
        rank = tuple(first.ranks) if method == "tucker" else first.rank
        g = len(parts)
        rank = (rank[0] * g, rank[1] * g) if method == "tucker" else rank * g
        return cls._like_checked(conv, method, rank, bias, implementation).load_decomposition(decomposition, conv.bias)

    @classmethod
    def _like_checked(cls, conv, method, rank, bias, implementation):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups > 1 and conv.in_channels == conv.groups:
            raise ValueError(f"a depthwise convolution (groups={conv.groups} = in_channels) has one input channel "
                             "per group: there is no channel mode to factorise")
        if bias not in (None, True, False):
            raise ValueError(f"bias must be None (keep the conv's), True or False, got {bias!r}")
        if bias is False and conv.bias is not None:
            raise ValueError("bias=False would drop the conv's bias and change its function; use bias=None")
        w = conv.weight
        return cls.like(conv, method, rank, bias=bias, implementation=implementation, device=w.device, dtype=w.dtype)

    def load_decomposition(self, decomposition, bias: torch.Tensor | None = None) -> "FactorizedConv2d":
        """Set the parameters from a decomposition of the kernel (a ``CPTensor`` for cp / cp4 / svd, a
        Tucker-2 ``TuckerTensor`` for tucker, of this layer's ranks; a grouped layer: a list of them, one
        per group) and ``bias`` (zero when None); returns self."""
        g = self.groups
        shape = (self.out_channels // g, self.in_channels // g, *self.kernel_size)  # of one group's block
        expected = {"cp": shape[:2] + (shape[2] * shape[3],), "svd": shape[:2]}.get(self.method, shape)
        parts = decomposition if isinstance(decomposition, (list, tuple)) else [decomposition]
        if len(parts) != g:
            raise ValueError(f"a layer of groups={g} is made of {g} decompositions (one per group), got "
                             f"{len(parts)}")
        share = tuple(r // g for r in self.rank) if self.method == "tucker" else self.rank // g
        for part in parts:
            _check_container(self.method, part)
            got = tuple(part.ranks) if self.method == "tucker" else part.rank
            if got != share:
                raise ValueError(f"the decomposition has rank {got}, this layer {share}"
                                 + (f" per group (rank {self.rank}, groups={g})" if g > 1 else ""))
            if tuple(part.shape) != expected:
                what = "of this layer's kernel" if g == 1 else "of one group's block of this layer's kernel"
                raise ValueError(f"the decomposition is of a tensor of shape {tuple(part.shape)}, not {what} "
                                 f"{expected} (method={self.method})")
        if bias is not None and (self.bias is None or tuple(bias.shape) != (self.out_channels,)):
            raise ValueError(f"bias must be [{self.out_channels}] for a layer with a bias, got "
                             f"{tuple(bias.shape)}" + (" for a layer without one" if self.bias is None else ""))
        if self.method == "tucker":
            factors = factors_from_groups([factors_from_tucker(part, shape) for part in parts])
        else:
            factors = factors_from_groups([factors_from_cp(part, self.method, shape) for part in parts])
        with torch.no_grad():
            for name, value in factors.items():
                param = getattr(self, name)
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"the decomposition gives {name} of shape {tuple(value.shape)}, but this layer's "
                                     f"{name} is {tuple(param.shape)} (method={self.method}, rank={self.rank})")
                param.copy_(value)
            if self.bias is not None:
                self.bias.copy_(bias.detach()) if bias is not None else self.bias.zero_()
        return self

    @classmethod
    def like(cls, conv: nn.Conv2d, method: str = "cp", rank=0.5, *, bias: bool | None = None,
             **kwargs) -> "FactorizedConv2d":
        """A layer with ``conv``'s arguments (channels, kernel, stride, padding, dilation, padding
        mode; a bias where ``conv`` has one or ``bias`` is True), freshly initialised. ``kwargs`` go
        to the constructor (``implementation``, ``device``, ``dtype``)."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.bias is not None or bias is True, method=method, rank=rank, groups=conv.groups,
                   padding_mode=conv.padding_mode, **kwargs)

    def spec(self) -> dict:
        """The constructor arguments that rebuild this layer (plain values, for saving)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias is not None, "method": self.method,
                "rank": list(self.rank) if isinstance(self.rank, tuple) else self.rank,
                "padding_mode": self.padding_mode, "implementation": self.implementation,
                **({"groups": self.groups} if self.groups != 1 else {}),
                **({"fused_relu": True} if self.fused_relu else {})}

    @property
    def geometry(self) -> ConvGeometry:
        """The plain description of this layer's convolution that dispatch and pricing take."""
        return self._state()[1]

    def _state(self) -> tuple:
        """``(configuration, geometry, remembered fused_unsupported_reasons)``, rebuilt when an argument of
        the layer changes: forward needs them on every call, and building them costs more than a small
        layer's op."""
        config = (self.method, self.in_channels, self.out_channels, self.rank, self.kernel_size, self.stride,
                  self.padding, self.dilation, self.padding_mode, self.bias is not None, self.implementation,
                  self.fused_relu, self.groups)
        state = self.__dict__.get("_dispatch_state")
        if state is None or state[0] != config:
            state = self.__dict__["_dispatch_state"] = (config, ConvGeometry.of(self), {})
        return state

    def component_norms(self) -> torch.Tensor:
        """CP (cp, cp4): the norm of each rank-1 term of the kernel, the product of its factors' norms."""
        return cp_component_norms(self.method, self.first, self.spatial, self.last, getattr(self, "spatial_w", None),
                                  self.groups)

    def kernel(self) -> torch.Tensor:
        """The dense kernel ``[C_out, C_in / groups, kh, kw]`` this layer computes with."""
        return kernel_from_factors(self.method, self.first, self.spatial, self.last, getattr(self, "spatial_w", None),
                                   self.groups)

    def to_conv(self) -> nn.Conv2d:
        """The equivalent dense ``nn.Conv2d`` (same arguments, the reconstructed kernel, the bias). A layer
        with a fused ReLU has none: use :meth:`to_chain`, or ``nn.Sequential(layer.to_conv(), nn.ReLU())``
        after setting ``fused_relu = False``."""
        if self.fused_relu:
            raise ValueError("to_conv: this layer has a fused ReLU, which an nn.Conv2d cannot hold; use to_chain() "
                             "(which ends with an nn.ReLU)")
        w = self.first
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def to_chain(self) -> nn.Sequential:
        """The same function as a chain of standard modules (``nn.Conv2d``, a padding module where the chain
        pads explicitly, an ``nn.ReLU`` where the layer has a fused one), with copies of this layer's
        parameters: what the unfused path computes, for runtimes and counters that know only standard
        layers."""
        g = self.geometry
        kw = {"device": self.first.device, "dtype": self.first.dtype}
        r_out, r_in = self._rank_pair()
        groups = self.groups
        pad = g.explicit_pad
        padding = g.symmetric_padding if pad is None else (0, 0)
        mods = []
        if self.method == "svd":  # the first 1x1 carries the stride, padding and dilation
            if pad is not None:
                mods.append(_PADS[self.padding_mode](pad))
            mods.append(nn.Conv2d(self.in_channels, r_in, 1, self.stride, padding, self.dilation, groups=groups,
                                  bias=False, **kw))
        else:
            mods.append(nn.Conv2d(self.in_channels, r_in, 1, groups=groups, bias=False, **kw))
            if pad is not None:
                mods.append(_PADS[self.padding_mode](pad))
        (sh, sw), (dh, dw), (kh, kwd) = self.stride, self.dilation, self.kernel_size
        if self.method == "tucker":
            mods.append(nn.Conv2d(r_in, r_out, self.kernel_size, self.stride, padding, self.dilation, groups=groups,
                                  bias=False, **kw))
        elif self.method == "cp":
            mods.append(nn.Conv2d(r_in, r_in, self.kernel_size, self.stride, padding, self.dilation, groups=r_in,
                                  bias=False, **kw))
        elif self.method == "cp4":
            mods.append(nn.Conv2d(r_in, r_in, (kh, 1), (sh, 1), (padding[0], 0), (dh, 1), groups=r_in, bias=False,
                                  **kw))
            mods.append(nn.Conv2d(r_in, r_in, (1, kwd), (1, sw), (0, padding[1]), (1, dw), groups=r_in, bias=False,
                                  **kw))
        mods.append(nn.Conv2d(r_out, self.out_channels, 1, groups=groups, bias=self.bias is not None, **kw))
        if self.fused_relu:
            mods.append(nn.ReLU())
        chain = nn.Sequential(*mods)
        convs = [m for m in mods if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for conv, value in zip(convs, self.chain_factors()):  # the chain's convs in order
                conv.weight.copy_(value)
            if self.bias is not None:
                convs[-1].bias.copy_(self.bias)
        return chain.train(self.training)

    # ------------------------------------------------------------------------------------------ forward
    def _params(self) -> tuple:
        return self.first, self.spatial, self.last, self.bias, getattr(self, "spatial_w", None)

    def fused_unsupported_reasons(self, x: torch.Tensor | None = None) -> list:
        """Why the fused op cannot compute this layer (on the input ``x``, when given); empty when it can."""
        if x is None:
            return dispatch.layer_unsupported_reasons(self.geometry, self.method)
        return dispatch.fused_unsupported_reasons(self.geometry, self.method, x, self.first,
                                                  explicit=self.implementation == "fused")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # eval mode: the prepared call, built on the first one
            plan = self.__dict__.get("_inference_plan")
            if plan is None:
                plan = self.__dict__["_inference_plan"] = InferencePlan()
            y = plan(self, x)
            if y is not None:
                return y
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"FactorizedConv2d expects a 4-D input [N, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"FactorizedConv2d expects {self.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        config, geometry, reasons_seen = self._state()
        if is_tracing() and torch.onnx.is_in_onnx_export():
            # ONNX has no fused op: both exporters get the chain of standard convolutions.
            return self._unfused(x, geometry)
        if self.implementation != "unfused":
            if torch.compiler.is_compiling():
                reasons = self.fused_unsupported_reasons(x)
            else:  # remembered per input device and dtype
                key = (x.device, x.dtype, self.first.dtype)
                reasons = reasons_seen.get(key)
                if reasons is None:
                    reasons = reasons_seen[key] = self.fused_unsupported_reasons(x)
            if not reasons:
                if self.implementation == "fused" or self._auto_picks_fused(x, config):
                    return self._fused(x, geometry)
            elif self.implementation == "fused":
                raise ValueError("implementation='fused' cannot run this input: " + "; ".join(reasons))
        return self._unfused(x, geometry)

    def _auto_picks_fused(self, x: torch.Tensor, config: tuple) -> bool:
        """implementation="auto" where both can run. Under autograd the chain: the fused op's backward
        recomputes the chain's intermediates anyway, and a timed choice would make training (or any
        computation of gradients) irreproducible. An eval-mode layer under a tracer or exporter (which
        never times) takes the fused op: that graph is for inference."""
        if torch.is_grad_enabled() and (x.requires_grad or self.first.requires_grad) and (
                self.training or not is_tracing()):
            return False
        if not autotuner.active:  # off, or under a tracer: the fused op, deterministically
            return True
        key = (config, tuple(x.shape), x.stride(), x.dtype, x.device, torch.get_num_threads())
        return autotuner.picks_fused(key, lambda: self._fused(x), lambda: self._unfused(x), x.device, checked=True)

    def _unfused(self, x: torch.Tensor, geometry: ConvGeometry | None = None) -> torch.Tensor:
        first, spatial, last, bias, spatial_w = self._params()
        return dispatch.unfused_forward(geometry or self.geometry, self.method, self._rank_pair()[1], x, first,
                                        spatial, last, bias, spatial_w, self.skip_padding_taps, self.fused_relu)

    def _fused(self, x: torch.Tensor, geometry: ConvGeometry | None = None) -> torch.Tensor:
        first, spatial, last, bias, spatial_w = self._params()
        return dispatch.fused_forward(geometry or self.geometry, self.method, x, first, spatial, last, bias,
                                      spatial_w, self.fused_relu)

    def prepare_for_inference(self, prepack: bool = True) -> "FactorizedConv2d":
        """Build now what an eval-mode call keeps ready (the factors as the op takes them, its arguments,
        the dispatch decision per input shape), so that it costs the op and little else. Every eval-mode
        layer builds it on its first call anyway (without ``prepack``), and rebuilds it by itself when a
        parameter or the implementation changes; training mode, gradients, tracers and inputs of another
        device or dtype take the ordinary path. :func:`tdconv.optimize_for_inference` calls it on every
        layer; returns self.

        ``prepack`` (CPU): the factors are also packed once into the micro-kernel's panels (the Tucker
        core over all its taps), which a call would otherwise pack every time. The packs are copies: a
        parameter changed in place is seen through its version counter and repacked, but an edit through
        ``.data`` (which bypasses the counter) is not. Call this again after one."""
        if not isinstance(prepack, bool):
            raise TypeError(f"prepack must be a bool, got {type(prepack).__name__}")
        self.__dict__["_inference_plan"] = InferencePlan(self, prepack=prepack)
        return self

    # ------------------------------------------------------------------------------------------ cost
    def _rank_pair(self, rank=None) -> tuple:
        rank = self.rank if rank is None else rank
        return tuple(rank) if self.method == "tucker" else (rank, rank)

    def num_params(self, rank=None) -> int:
        """Parameters of this layer, or of the same layer at another ``rank``."""
        return layer_cost(self.geometry, self.method, self.rank if rank is None else rank, "params")

    def macs(self, in_hw: tuple, rank=None) -> int:
        """Multiply-accumulates of one image of spatial size ``in_hw`` through the layer, counted as
        ptflops counts :meth:`to_chain` (see :func:`tdconv.ranks.layer_cost`); of the same layer at
        another ``rank`` when given."""
        return layer_cost(self.geometry, self.method, self.rank if rank is None else rank, "macs", tuple(in_hw))

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
             f", padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        s += f", method={self.method}, rank={self.rank}"
        return s + (", fused_relu=True" if self.fused_relu else "")
