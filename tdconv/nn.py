"""``FactorizedConv2d``: a convolution whose kernel is kept in CP or Tucker-2 form.

For a kernel ``W[C_out, C_in, kh, kw]`` (Lebedev et al., ICLR 2015; Kim et al., ICLR 2016):

- ``method="cp"``: CP of the order-3 kernel ``[C_out, C_in, kh*kw]`` at rank R: 1x1 conv C_in->R,
  depthwise kh x kw conv on R channels (the original stride / padding / dilation), 1x1 conv R->C_out.
- ``method="cp4"``: CP of the order-4 kernel: 1x1 conv, depthwise kh x 1, depthwise 1 x kw, 1x1 conv.
- ``method="tucker"``: Tucker-2 on the channel modes at ranks (R_out, R_in): 1x1 conv C_in->R_in,
  kh x kw core conv R_in->R_out, 1x1 conv R_out->C_out.

``implementation="auto"`` computes the layer with a fused op when it can run the input (today: on the
CPU, zero padding; the CUDA kernel of ``cp_conv2d`` exists but is only used when asked for with
``"fused"`` until it has been validated on a GPU) and is the faster of the two for that input (timed
once per configuration, see :func:`set_autotune`), and with the unfused chain of convolutions otherwise; ``"fused"`` raises with the
reasons when it cannot; ``"unfused"`` always takes the chain. The fused ops are
``torch.ops.tdconv.cp_conv2d`` (CP; also cp4, whose two 1-D depthwise filters it applies as their
kh x kw outer product: the same function, with kh * kw instead of kh + kw multiply-adds per factor
channel, a small part of the layer's cost) and ``torch.ops.tdconv.tucker_conv2d`` (Tucker-2).
Grouped convolutions are refused (``groups`` must be 1): a per-group decomposition changes the
layer's structure and is left to a later release.
"""
from __future__ import annotations

import functools
import math
import numbers
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from . import ops as _ops
from .decompose import cp_als, tucker_hooi

__all__ = ["FactorizedConv2d", "LiveTapConv2d", "resolve_rank", "set_autotune", "skip_padding_taps"]

METHODS = ("cp", "cp4", "tucker")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
IMPLEMENTATIONS = ("auto", "fused", "unfused")

_AUTOTUNE = {"enabled": True}
_AUTOTUNE_CHOICES: dict = {}
# ``auto`` keeps the fused op unless the chain's median time is below fused / AUTOTUNE_MARGIN.
AUTOTUNE_MARGIN = 1.1


def set_autotune(enabled: bool) -> None:
    """Whether ``implementation="auto"`` times the fused op against the unfused chain the first time
    it meets a layer configuration and input shape (and layout, dtype, device, thread count), then
    keeps the faster one for them (default: on; like ``torch.backends.cudnn.benchmark``). The chain
    must be faster by more than ``AUTOTUNE_MARGIN`` (10 %) to be chosen: single timings on a shared
    machine vary by more than that, and the fused op never allocates the two intermediate feature
    maps. The fused op is not faster everywhere: on large feature maps the CPU's own convolutions can
    win. When off, and always while tracing (``torch.compile``, ``torch.export``), ``"auto"`` takes
    the fused op whenever it can run. ``implementation="fused"`` / ``"unfused"`` pin the choice (and
    the exact rounding of the result)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _AUTOTUNE["enabled"] = enabled
    _AUTOTUNE_CHOICES.clear()


@functools.lru_cache(maxsize=4096)
def _live_window(n: int, k: int, s: int, p: int, d: int):
    """Along one axis of length ``n``: ``(first tap, padding)`` of the taps of a size-``k`` kernel
    (stride ``s``, zero padding ``p``, dilation ``d``) that read at least one input element, when
    dropping the others changes nothing but the work; None when every tap is live."""
    o = (n + 2 * p - d * (k - 1) - 1) // s + 1
    if o <= 0:
        return None
    live = []
    for t in range(k):  # tap t reads i*s - p + t*d for outputs i in [0, o)
        lo, hi = p - t * d, n - 1 + p - t * d
        i0 = max(0, -((-lo) // s))
        if i0 < o and i0 * s <= hi:
            live.append(t)
    if not live or len(live) == k:
        return None
    t0, k2 = live[0], live[-1] - live[0] + 1
    p2 = p - t0 * d
    if p2 < 0 or (n + 2 * p2 - d * (k2 - 1) - 1) // s + 1 != o:
        return None
    return t0, k2, p2


def _live_conv2d(x, weight, bias, stride, padding, dilation, groups):
    """``F.conv2d`` with zero ``padding`` (a pair), skipping the kernel taps that only ever multiply
    padding at ``x``'s size (e.g. all but the centre of a 3x3 kernel on a 1x1 feature map). The same
    function; the skipped taps get zero gradient, as they do in the full convolution."""
    kh, kw = weight.shape[2:]
    wh = _live_window(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ww = _live_window(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if wh is None and ww is None:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    (h0, h, ph), (w0, w, pw) = wh or (0, kh, padding[0]), ww or (0, kw, padding[1])
    return F.conv2d(x, weight[:, :, h0:h0 + h, w0:w0 + w], bias, stride, (ph, pw), dilation, groups)


class LiveTapConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that skips the kernel taps which, at the input's size, only read zero padding.

    The same parameters, state dict and function as ``nn.Conv2d``; only the work differs. It matters
    for ImageNet-style networks on small images: ResNet18's layer4 on 32x32 inputs runs 3x3 convs on
    1x1 feature maps, where 8 of the 9 taps multiply padding, and the backward pass of those convs
    costs as much as the rest of the network. Made by :func:`skip_padding_taps`.
    """

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        return _live_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def skip_padding_taps(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every ``nn.Conv2d`` of ``model`` a :class:`LiveTapConv2d`, and every
    :class:`FactorizedConv2d`'s unfused chain skip such taps too (in place; returns ``model``).
    ``enabled=False`` undoes it. Outputs change only by floating-point rounding; parameters and
    state dict keys are unchanged, and :func:`tdconv.compress.count_complexity` still counts the
    nominal MACs."""
    for m in model.modules():
        if enabled and type(m) is nn.Conv2d:
            m.__class__ = LiveTapConv2d
        elif not enabled and type(m) is LiveTapConv2d:
            m.__class__ = nn.Conv2d
        elif isinstance(m, FactorizedConv2d):
            m.skip_padding_taps = enabled
    return model


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _pair_of(value, name: str, minimum: int) -> tuple:
    pair = _pair(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum
                             for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return tuple(int(v) for v in pair)


def resolve_rank(rank, method: str, out_channels: int, in_channels: int):
    """The rank(s) a ``rank`` argument means for a conv with these channel counts.

    ``rank`` is an int (CP) or a pair ``(R_out, R_in)`` (Tucker), or a float in (0, 1]: that
    fraction of the channels (CP: of ``out_channels``; Tucker: of each channel mode), at least 1.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"rank as a fraction of the channels must be in (0, 1], got {rank}")
        if method == "tucker":
            return (max(1, int(rank * out_channels)), max(1, int(rank * in_channels)))
        return max(1, int(rank * out_channels))
    if method == "tucker":
        if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
            rank = (rank, rank)
        try:
            r_out, r_in = rank
        except (TypeError, ValueError):
            raise ValueError(f"rank for method='tucker' must be an int, a pair (R_out, R_in) or a fraction, "
                             f"got {rank!r}") from None
        r_out, r_in = _positive_int(r_out, "rank (R_out)"), _positive_int(r_in, "rank (R_in)")
        if r_out > out_channels or r_in > in_channels:
            raise ValueError(f"rank {(r_out, r_in)} out of range: Tucker ranks must be at most "
                             f"(out_channels, in_channels) = {(out_channels, in_channels)}")
        return (r_out, r_in)
    return _positive_int(rank, "rank")


class FactorizedConv2d(nn.Module):
    """A 2-D convolution with a CP or Tucker-2 factorised kernel; the semantics of ``nn.Conv2d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, dilation : int or (int, int)
    padding : int, (int, int), "same" or "valid"
    bias : bool
    method : {"cp", "cp4", "tucker"}
    rank : int, (int, int) or float
        CP rank R, Tucker ranks (R_out, R_in), or a fraction of the channels (default 0.5).
    padding_mode : {"zeros", "reflect", "replicate", "circular"}
    implementation : {"auto", "fused", "unfused"}
        ``"auto"`` runs the fused op when it can run the input and the unfused chain otherwise;
        ``"fused"`` raises with the reasons when it cannot run; ``"unfused"`` always takes the chain.

    Attributes (``nn.Parameter``)
    -----------------------------
    first : [R or R_in, C_in, 1, 1]      1x1 conv into the factor space
    spatial : cp [R, 1, kh, kw]; cp4 ([R, 1, kh, 1], [R, 1, 1, kw]) as ``spatial`` and ``spatial_w``;
              tucker: the core [R_out, R_in, kh, kw]
    last : [C_out, R or R_out, 1, 1]     1x1 conv back to the output channels
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

    skip_padding_taps = False  # see skip_padding_taps(): the unfused chain skips taps that only read padding

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True, *,
                 method="cp", rank=0.5, padding_mode="zeros", implementation="auto", device=None, dtype=None):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
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
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation
        self.method = method
        self.rank = resolve_rank(rank, method, self.out_channels, self.in_channels)
        if implementation == "fused" and self.fused_unsupported_reasons():
            raise ValueError("implementation='fused' cannot run: " + "; ".join(self.fused_unsupported_reasons()))
        kw = {"device": device, "dtype": dtype}
        kh, kwd = self.kernel_size
        r_mid, r_in = (self.rank if method == "tucker" else (self.rank, self.rank))
        self.first = nn.Parameter(torch.empty(r_in, self.in_channels, 1, 1, **kw))
        if method == "cp":
            self.spatial = nn.Parameter(torch.empty(self.rank, 1, kh, kwd, **kw))
        elif method == "cp4":
            self.spatial = nn.Parameter(torch.empty(self.rank, 1, kh, 1, **kw))
            self.spatial_w = nn.Parameter(torch.empty(self.rank, 1, 1, kwd, **kw))
        else:
            self.spatial = nn.Parameter(torch.empty(r_mid, r_in, kh, kwd, **kw))
        self.last = nn.Parameter(torch.empty(self.out_channels, r_mid, 1, 1, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **kw)) if bias else None
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Random factors whose product has the variance of ``nn.Conv2d``'s default kernel init."""
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        target = 1.0 / (3.0 * fan_in)  # variance of U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        with torch.no_grad():
            factors = [self.first, self.spatial, self.last] + ([self.spatial_w] if self.method == "cp4" else [])
            # A kernel entry sums `terms` products of one entry of each factor.
            terms = self.rank if self.method != "tucker" else self.rank[0] * self.rank[1]
            std = (target / terms) ** (1.0 / (2 * len(factors)))
            for f in factors:
                f.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)

    # ------------------------------------------------------------------------------------------ conversions
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, method: str = "cp", rank=0.5, *, implementation: str = "auto",
                  bias: bool | None = None, **decomposition_options) -> "FactorizedConv2d":
        """Decompose ``conv``'s kernel with the engine (no gradient tracking) and keep its bias.

        ``decomposition_options`` go to :func:`tdconv.cp_als` (cp, cp4) or :func:`tdconv.tucker_hooi`
        (tucker). The same defaults as the constructor. Each CP component's norm is spread equally
        over its factors (the function is unchanged; SGD on such factors is well conditioned).
        ``bias``: None keeps the conv's (or its lack of one); True gives the layer a bias even where
        the conv has none, initialised to zero (the function is unchanged; the seed's factorised
        layers had one).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"grouped convolutions are not supported (conv.groups={conv.groups}); "
                             "only groups=1 convolutions can be factorised")
        if bias not in (None, True, False):
            raise ValueError(f"bias must be None (keep the conv's), True or False, got {bias!r}")
        if bias is False and conv.bias is not None:
            raise ValueError("bias=False would drop the conv's bias and change its function; use bias=None")
        w = conv.weight.detach()
        c_out, c_in, kh, kw = w.shape
        layer = cls.like(conv, method, rank, bias=bias, implementation=implementation, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if method in ("cp", "cp4"):
                x = w.reshape(c_out, c_in, kh * kw) if method == "cp" else w
                cp = cp_als(x, layer.rank, **decomposition_options)
                # The weights are column norms (>= 0): each factor takes weights ** (1 / n_factors).
                scale = cp.weights ** (1.0 / len(cp.factors))
                a, b, *spatial = [f * scale for f in cp.factors]
                layer.last.copy_(a.reshape(c_out, -1, 1, 1))
                layer.first.copy_(b.t().reshape(-1, c_in, 1, 1))
                if method == "cp":
                    layer.spatial.copy_(spatial[0].t().reshape(-1, 1, kh, kw))
                else:
                    layer.spatial.copy_(spatial[0].t().reshape(-1, 1, kh, 1))
                    layer.spatial_w.copy_(spatial[1].t().reshape(-1, 1, 1, kw))
            else:
                t = tucker_hooi(w, layer.rank, modes=(0, 1), **decomposition_options)
                u_out, u_in = t.factors
                layer.last.copy_(u_out.reshape(c_out, -1, 1, 1))
                layer.first.copy_(u_in.t().reshape(-1, c_in, 1, 1))
                layer.spatial.copy_(t.core)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
            elif layer.bias is not None:
                layer.bias.zero_()
        return layer

    @classmethod
    def like(cls, conv: nn.Conv2d, method: str = "cp", rank=0.5, *, bias: bool | None = None,
             **kwargs) -> "FactorizedConv2d":
        """A layer with ``conv``'s arguments (channels, kernel, stride, padding, dilation, padding
        mode; a bias where ``conv`` has one or ``bias`` is True), freshly initialised. ``kwargs`` go
        to the constructor (``implementation``, ``device``, ``dtype``)."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.bias is not None or bias is True, method=method, rank=rank, padding_mode=conv.padding_mode,
                   **kwargs)

    def spec(self) -> dict:
        """The constructor arguments that rebuild this layer (plain values, for saving)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias is not None, "method": self.method,
                "rank": list(self.rank) if isinstance(self.rank, tuple) else self.rank,
                "padding_mode": self.padding_mode, "implementation": self.implementation}

    def component_norms(self) -> torch.Tensor:
        """CP (cp, cp4): the norm of each rank-1 term of the kernel, the product of its factors' norms."""
        if self.method == "tucker":
            raise ValueError("component norms are defined for CP layers (method 'cp' or 'cp4'), not 'tucker'")
        norms = self.first.flatten(1).norm(dim=1) * self.spatial.flatten(1).norm(dim=1) * \
            self.last.flatten(1).norm(dim=0)
        if self.method == "cp4":
            norms = norms * self.spatial_w.flatten(1).norm(dim=1)
        return norms.detach()

    def kernel(self) -> torch.Tensor:
        """The dense kernel ``[C_out, C_in, kh, kw]`` this layer computes with."""
        first = self.first.flatten(1)  # [R_in, C_in]
        last = self.last.flatten(1)    # [C_out, R_out]
        if self.method == "tucker":
            return torch.einsum("or,rshw,si->oihw", last, self.spatial, first)
        spatial = self.spatial[:, 0]  # [R, kh, kw] or [R, kh, 1]
        if self.method == "cp4":
            spatial = spatial * self.spatial_w[:, 0]  # [R, kh, 1] * [R, 1, kw]
        return torch.einsum("or,rhw,ri->oihw", last, spatial, first)

    def to_conv(self) -> nn.Conv2d:
        """The equivalent dense ``nn.Conv2d`` (same arguments, the reconstructed kernel, the bias)."""
        w = self.first
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # ------------------------------------------------------------------------------------------ forward
    def fused_unsupported_reasons(self, x: torch.Tensor | None = None) -> list:
        """Why the fused op cannot compute this layer (on the input ``x``, when given); empty when it can."""
        reasons = []
        if self.padding_mode != "zeros":
            reasons.append(f"the fused op pads with zeros only, not padding_mode={self.padding_mode!r}")
        if self._symmetric_padding() is None:
            reasons.append("padding='same' with an even dilated kernel pads asymmetrically; the fused op pads "
                           "symmetrically")
        if x is not None:
            op = "tucker_conv2d" if self.method == "tucker" else "cp_conv2d"
            reasons += _ops.fused_unsupported_reasons(x, self.first, op, explicit=self.implementation == "fused")
        return reasons

    def _pads(self) -> tuple:
        """((top, bottom), (left, right)) zero-or-mode padding of the spatial conv."""
        if self.padding == "valid":
            return (0, 0), (0, 0)
        if self.padding == "same":  # as nn.Conv2d: the odd pixel goes after
            totals = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
            return tuple((t // 2, t - t // 2) for t in totals)
        return tuple((p, p) for p in self.padding)

    def _symmetric_padding(self):
        """The (ph, pw) padding of the spatial conv, or None when it is asymmetric."""
        (top, bottom), (left, right) = self._pads()
        return (top, left) if top == bottom and left == right else None

    def _spatial_padding(self):
        """(padding for F.conv2d, explicit F.pad tuple or None) of the spatial conv."""
        symmetric = self._symmetric_padding()
        if self.padding_mode == "zeros" and symmetric is not None:
            return symmetric, None
        (top, bottom), (left, right) = self._pads()
        return (0, 0), (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"FactorizedConv2d expects a 4-D input [N, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"FactorizedConv2d expects {self.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        if self.implementation != "unfused":
            reasons = self._fused_reasons(x)
            if not reasons:
                if self.implementation == "fused" or self._auto_picks_fused(x):
                    return self._fused(x)
            elif self.implementation == "fused":
                raise ValueError("implementation='fused' cannot run this input: " + "; ".join(reasons))
        return self._unfused(x)

    def _fused_reasons(self, x: torch.Tensor) -> list:
        """:meth:`fused_unsupported_reasons`, remembered per input device and dtype (and everything else
        it reads): ``forward`` asks on every call, and the answer costs more than a small layer's op."""
        if torch.compiler.is_compiling():
            return self.fused_unsupported_reasons(x)
        key = (x.device, x.dtype, self.first.dtype, self.padding_mode, self.padding, self.kernel_size,
               self.dilation, self.implementation)
        cache = self.__dict__.setdefault("_fused_reasons_cache", {})
        reasons = cache.get(key)
        if reasons is None:
            reasons = cache[key] = self.fused_unsupported_reasons(x)
        return reasons

    def _auto_picks_fused(self, x: torch.Tensor) -> bool:
        """implementation="auto" where both can run: the faster one for this configuration, timed once.
        Under autograd the chain: the fused op's backward recomputes the chain's intermediates anyway."""
        if torch.is_grad_enabled() and (x.requires_grad or self.first.requires_grad):
            return False
        if not _AUTOTUNE["enabled"] or torch.compiler.is_compiling():
            return True
        key = (self.method, self.in_channels, self.out_channels, self.rank, self.kernel_size, self.stride,
               self._pads(), self.dilation, self.bias is not None, tuple(x.shape), x.stride(), x.dtype, x.device,
               torch.get_num_threads())
        choice = _AUTOTUNE_CHOICES.get(key)
        if choice is None:
            choice = _AUTOTUNE_CHOICES[key] = self._fused_is_faster(x)
        return choice

    def _fused_is_faster(self, x: torch.Tensor, rounds: int = 5) -> bool:
        """Whether the fused op's median over `rounds` interleaved timings of each implementation on ``x``
        (after a warm-up) is within ``AUTOTUNE_MARGIN`` of the chain's, or below it."""
        def sync():
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)

        times = {self._fused: [], self._unfused: []}
        with torch.no_grad():
            for fn in times:
                fn(x)
            for _ in range(rounds):
                for fn, t in times.items():
                    sync()
                    start = time.perf_counter()
                    fn(x)
                    sync()
                    t.append(time.perf_counter() - start)
        fused, unfused = (statistics.median(t) for t in times.values())
        return fused <= unfused * AUTOTUNE_MARGIN

    def _unfused(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.first)
        padding, pad = self._spatial_padding()
        if pad is not None:
            y = F.pad(y, pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        conv = _live_conv2d if pad is None and self.skip_padding_taps else F.conv2d
        if self.method == "tucker":
            y = conv(y, self.spatial, None, self.stride, padding, self.dilation, 1)
        elif self.method == "cp":
            y = conv(y, self.spatial, None, self.stride, padding, self.dilation, self.rank)
        else:
            sh, sw = self.stride
            dh, dw = self.dilation
            y = F.conv2d(y, self.spatial, None, (sh, 1), (padding[0], 0), (dh, 1), groups=self.rank)
            y = F.conv2d(y, self.spatial_w, None, (1, sw), (0, padding[1]), (1, dw), groups=self.rank)
        return F.conv2d(y, self.last, self.bias)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        first, last = self.first.flatten(1), self.last.flatten(1)
        conv = (self.stride, self._symmetric_padding(), self.dilation)
        if self.method == "tucker":
            return _ops.tucker_conv2d(x, first, self.spatial, last, self.bias, *conv)
        spatial = self.spatial[:, 0]
        if self.method == "cp4":
            spatial = spatial * self.spatial_w[:, 0]  # [R, kh, 1] * [R, 1, kw]
        return _ops.cp_conv2d(x, first, spatial, last, self.bias, *conv)

    def num_params(self, rank=None) -> int:
        """Parameters of this layer, or of the same layer at another ``rank`` (an int for CP, a pair for
        Tucker)."""
        kh, kw = self.kernel_size
        r_out, r_in = self._rank_pair(rank)
        spatial = {"cp": r_in * kh * kw, "cp4": r_in * (kh + kw), "tucker": r_out * r_in * kh * kw}[self.method]
        return int(r_in * self.in_channels + spatial + self.out_channels * r_out
                   + (self.out_channels if self.bias is not None else 0))

    def _rank_pair(self, rank=None) -> tuple:
        rank = self.rank if rank is None else rank
        return tuple(rank) if self.method == "tucker" else (rank, rank)

    def macs(self, in_hw: tuple, rank=None) -> int:
        """Multiply-accumulates of one image through the chain (counted as ptflops counts the three
        convolutions: input-resolution 1x1, output-resolution spatial conv and 1x1, plus the bias); of
        the same layer at another ``rank`` when given."""
        h, w = in_hw
        pads = self._pads()
        ho, wo = [(n + sum(p) - d * (k - 1) - 1) // s + 1
                  for n, p, d, k, s in zip((h, w), pads, self.dilation, self.kernel_size, self.stride)]
        kh, kw = self.kernel_size
        r_out, r_in = self._rank_pair(rank)
        spatial = {"cp": r_in * kh * kw, "cp4": 0, "tucker": r_out * r_in * kh * kw}[self.method]
        macs = self.in_channels * r_in * h * w + spatial * ho * wo + r_out * self.out_channels * ho * wo
        if self.method == "cp4":  # kh x 1 at (Ho, W), then 1 x kw at (Ho, Wo)
            wi = w + sum(pads[1])
            macs += r_in * kh * ho * wi + r_in * kw * ho * wo
        if self.bias is not None:
            macs += self.out_channels * ho * wo
        return int(macs)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
             f", padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", method={self.method}, rank={self.rank}"
