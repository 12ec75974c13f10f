"""Convolutions that skip the kernel taps which, at the input's size, only ever read zero padding."""
from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import nn

__all__ = ["LiveTapConv2d", "live_conv2d", "skip_padding_taps"]


@functools.lru_cache(maxsize=4096)
def _live_window(n: int, k: int, s: int, p: int, d: int):
    """Along one axis of length ``n``: ``(first tap, taps, padding)`` of the taps of a size-``k`` kernel
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


def live_conv2d(x, weight, bias, stride, padding, dilation, groups):
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
        return live_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def skip_padding_taps(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every ``nn.Conv2d`` of ``model`` a :class:`LiveTapConv2d`, and every factorised layer's
    unfused chain skip such taps too (in place; returns ``model``). ``enabled=False`` undoes it.

    Outputs change only by floating-point rounding; parameters and state dict keys are unchanged, and
    :func:`tdconv.compress.count_complexity` still counts the nominal MACs.

    Examples
    --------
    >>> import torch, torchvision, tdconv
    >>> model = tdconv.skip_padding_taps(torchvision.models.resnet18(num_classes=10))
    >>> type(model.layer4[0].conv2).__name__
    'LiveTapConv2d'
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if enabled and type(m) is nn.Conv2d:
            m.__class__ = LiveTapConv2d
        elif not enabled and type(m) is LiveTapConv2d:
            m.__class__ = nn.Conv2d
        elif hasattr(type(m), "skip_padding_taps") and not callable(getattr(type(m), "skip_padding_taps")):
            m.skip_padding_taps = enabled  # a factorised layer: its chain's spatial conv
    return model
