"""Typed wrappers over the ``torch.ops.tdconv`` operators, with their fake (meta) kernels and
autograd formulas, so that they work under ``torch.compile``, ``torch.export`` and training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext
from . import reference as _ref

__all__ = ["cp_conv2d", "cp_conv2d_unsupported_reasons"]

_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _out_hw(h, w, k, stride, padding, dilation):
    return ((h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1,
            (w + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1)


def cp_conv2d_unsupported_reasons(x: torch.Tensor, first: torch.Tensor) -> list:
    """Why ``torch.ops.tdconv.cp_conv2d`` cannot run on ``x`` (empty when it can)."""
    reasons = list(_ext.unavailable_reasons(x.device))
    if x.device.type != "cpu":
        reasons.append(f"cp_conv2d has no {x.device.type} kernel yet (CPU only)")
    if x.dtype not in _FUSED_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported (float32, float64, float16, bfloat16)")
    if first.dtype != x.dtype:
        reasons.append(f"the factors are {first.dtype} but the input is {x.dtype}")
    return reasons


def cp_conv2d(x, first, spatial, last, bias, stride, padding, dilation) -> torch.Tensor:
    """CP-factorised convolution in one op: ``last * depthwise(first * x) + bias``.

    Parameters
    ----------
    x : Tensor [N, C_in, H, W]
    first : Tensor [R, C_in]
    spatial : Tensor [R, kh, kw]
    last : Tensor [C_out, R]
    bias : Tensor [C_out] or None
    stride, padding, dilation : (int, int)
        Of the depthwise conv; padding is zero padding.

    Returns
    -------
    Tensor [N, C_out, Ho, Wo] in channels_last memory format.
    """
    if _ext.has_ext():
        return torch.ops.tdconv.cp_conv2d(x, first, spatial, last, bias, list(stride), list(padding), list(dilation))
    return _ref.cp_conv2d(x, first, spatial, last, bias, stride, padding, dilation)


if _ext.has_ext():
    @torch.library.register_fake("tdconv::cp_conv2d")
    def _cp_conv2d_fake(x, first, spatial, last, bias, stride, padding, dilation):
        torch._check(x.dim() == 4, lambda: "tdconv::cp_conv2d: x must be 4-D")
        torch._check(first.shape[1] == x.shape[1], lambda: "tdconv::cp_conv2d: channel mismatch")
        ho, wo = _out_hw(x.shape[2], x.shape[3], spatial.shape[1:], stride, padding, dilation)
        return torch.empty((x.shape[0], last.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    def _setup_context(ctx, inputs, output):
        x, first, spatial, last, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(x, first, spatial, last)
        ctx.has_bias = bias is not None
        ctx.conv = (tuple(stride), tuple(padding), tuple(dilation))

    def _backward(ctx, grad):
        x, first, spatial, last = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        rank = first.shape[0]
        # Recompute the two intermediates (cheap next to the convolutions' backward) in the
        # input's layout, then the chain rule through 1x1 -> depthwise -> 1x1 with ATen ops.
        y1 = F.conv2d(x, first[:, :, None, None])
        y2 = F.conv2d(y1, spatial[:, None], None, stride, padding, dilation, groups=rank)
        g_bias = grad.sum((0, 2, 3)) if ctx.has_bias else None
        g_last = torch.einsum("nohw,nrhw->or", grad, y2)
        g_y2 = F.conv2d(grad, last.t()[:, :, None, None])
        g_y1, g_spatial, _ = torch.ops.aten.convolution_backward(
            g_y2, y1, spatial[:, None], None, list(stride), list(padding), list(dilation), False, [0, 0], rank,
            [True, True, False])
        g_first = torch.einsum("nrhw,nihw->ri", g_y1, x)
        g_x = F.conv2d(g_y1, first.t()[:, :, None, None])
        return g_x, g_first, g_spatial[:, 0], g_last, g_bias, None, None, None

    torch.library.register_autograd("tdconv::cp_conv2d", _backward, setup_context=_setup_context)

    # ---- fake kernels of the decomposition engine (shapes only), so that the ops can be traced.
    @torch.library.register_fake("tdconv::cp_als")
    def _cp_als_fake(x, init, n_iter_max, tol, l2_reg, check_every):
        b, rank = x.shape[0], init[0].shape[-1]
        return (x.new_empty((b, rank)), [f.new_empty(f.shape) for f in init],
                x.new_empty((b, n_iter_max), dtype=torch.float64), x.new_empty((b,), dtype=torch.int64))

    @torch.library.register_fake("tdconv::cp_init_svd")
    def _cp_init_svd_fake(x, rank, random_fill):
        return [x.new_empty((x.shape[0], x.shape[n + 1], rank)) for n in range(x.dim() - 1)]

    def _tucker_core_shape(x, ranks, modes):
        shape = list(x.shape)
        for r, m in zip(ranks, modes):
            shape[m + 1] = r
        return shape

    @torch.library.register_fake("tdconv::tucker_hosvd")
    def _tucker_hosvd_fake(x, ranks, modes):
        return (x.new_empty(_tucker_core_shape(x, ranks, modes)),
                [x.new_empty((x.shape[0], x.shape[m + 1], r)) for r, m in zip(ranks, modes)])

    @torch.library.register_fake("tdconv::tucker_hooi")
    def _tucker_hooi_fake(x, init, modes, n_iter_max, tol, check_every):
        ranks = [f.shape[-1] for f in init]
        return (x.new_empty(_tucker_core_shape(x, ranks, modes)), [f.new_empty(f.shape) for f in init],
                x.new_empty((x.shape[0], n_iter_max), dtype=torch.float64),
                x.new_empty((x.shape[0],), dtype=torch.int64))

    @torch.library.register_fake("tdconv::mode_contract")
    def _mode_contract_fake(y, u, dim):
        return y.new_empty([s for i, s in enumerate(y.shape) if i != dim])
