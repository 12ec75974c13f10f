"""Typed wrappers over the ``torch.ops.tdconv`` operators, with their fake (meta) kernels and
autograd formulas, so that they work under ``torch.compile``, ``torch.export`` and training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext
from . import reference as _ref
from .utils import conv_output_size, is_tracing

__all__ = ["cp_conv2d", "tucker_conv2d", "fused_unsupported_reasons", "output_memory_format"]

_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# Which fused ops have a kernel for which device type.
FUSED_KERNELS = {"cp_conv2d": ("cpu", "cuda"), "tucker_conv2d": ("cpu", "cuda")}
# Fused kernels that have not run on hardware yet: ``implementation="auto"`` does not pick them (the
# unfused chain is known to be right); ``implementation="fused"`` runs them. The CUDA kernels'
# block program is tested on the CPU by its host emulation (tdconv::_fused_conv2d_emulated); they
# leave this set once benchmarks/gpu_check.sh has passed them on a GPU.
UNVALIDATED_KERNELS = {("cp_conv2d", "cuda"), ("tucker_conv2d", "cuda")}


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a fused op's output for the input ``x``: channels_last when ``x`` is
    channels_last and not also contiguous, contiguous otherwise (every backend and the fake kernel)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def fused_unsupported_reasons(x: torch.Tensor, first: torch.Tensor, op: str = "cp_conv2d",
                              explicit: bool = True) -> list:
    """Why the fused op ``op`` (``"cp_conv2d"`` or ``"tucker_conv2d"``) cannot run on ``x`` (empty
    when it can). With ``explicit=False`` (the choice of ``implementation="auto"``), a kernel that has
    not run on hardware yet also counts as a reason."""
    reasons = list(_ext.unavailable_reasons(x.device))
    devices = FUSED_KERNELS[op]
    if x.device.type not in devices:
        reasons.append(f"{op} has no {x.device.type} kernel yet ({', '.join(devices)} only)")
    elif not explicit and (op, x.device.type) in UNVALIDATED_KERNELS:
        reasons.append(f"the {x.device.type} kernel of {op} has not been validated on hardware yet; "
                       "implementation='fused' runs it")
    if x.dtype not in _FUSED_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported (float32, float64, float16, bfloat16)")
    if first.dtype != x.dtype:
        reasons.append(f"the factors are {first.dtype} but the input is {x.dtype}")
    return reasons


def _call(op: str, x, first, spatial, last, bias, stride, padding, dilation, relu=False) -> torch.Tensor:
    """The compiled op ``op`` where the extension can run it (:func:`tdconv._ext.use_extension`: the one
    seam and fallback policy of the package), its plain-PyTorch reference otherwise.

    Where no gradient can flow (grad mode off, or no argument requires grad) the op is called below
    the autograd dispatch key: its autograd formula is registered from Python, and passing through it
    costs about 25 us per call even when it has nothing to record (a third of a small layer's time).
    Never under a tracer or exporter, which must see the op itself."""
    if not (_ext._C is not None and x.device.type == "cpu") and not _ext.use_extension(x.device, op):
        return getattr(_ref, op)(x, first, spatial, last, bias, stride, padding, dilation, relu)
    fn = getattr(torch.ops.tdconv, op).default
    args = (x, first, spatial, last, bias, [int(v) for v in stride], [int(v) for v in padding],
            [int(v) for v in dilation], bool(relu))
    no_grad = not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, first, spatial, last, bias))
    if no_grad and not is_tracing():
        with torch._C._AutoDispatchBelowAutograd():
            return fn(*args)
    return fn(*args)


def cp_conv2d(x, first, spatial, last, bias, stride, padding, dilation, relu=False) -> torch.Tensor:
    """CP-factorised convolution in one op: ``last * depthwise(first * x) + bias``, then ``max(., 0)``
    where ``relu``.

    Parameters
    ----------
    x : Tensor [N, C_in, H, W]
    first : Tensor [R, C_in]
    spatial : Tensor [R, kh, kw]
    last : Tensor [C_out, R]
    bias : Tensor [C_out] or None
    stride, padding, dilation : (int, int)
        Of the depthwise conv; padding is zero padding.
    relu : bool
        A ReLU after the conv, fused into the op's last stage.

    Returns
    -------
    Tensor [N, C_out, Ho, Wo] in the input's layout: channels_last when ``x`` is channels_last (and not
    also contiguous, as a tensor with one channel or one pixel is), contiguous otherwise.
    """
    return _call("cp_conv2d", x, first, spatial, last, bias, stride, padding, dilation, relu)


def tucker_conv2d(x, first, core, last, bias, stride, padding, dilation, relu=False) -> torch.Tensor:
    """Tucker-2-factorised convolution in one op: ``last * conv(core, first * x) + bias``.

    As :func:`cp_conv2d`, with ``first`` [R_in, C_in], ``core`` [R_out, R_in, kh, kw] (the conv that
    ``stride``, ``padding`` and ``dilation`` apply to) and ``last`` [C_out, R_out].
    """
    return _call("tucker_conv2d", x, first, core, last, bias, stride, padding, dilation, relu)


if _ext.has_ext():
    def _conv_fake(x, first, spatial, last, bias, stride, padding, dilation, relu=False):
        torch._check(x.dim() == 4, lambda: "the input must be 4-D")
        torch._check(first.shape[1] == x.shape[1], lambda: "channel mismatch between x and first")
        ho, wo = conv_output_size(x.shape[2:], tuple(spatial.shape[-2:]), tuple(stride), tuple(padding),
                                  tuple(dilation))
        return torch.empty((x.shape[0], last.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                           memory_format=output_memory_format(x))

    torch.library.register_fake("tdconv::cp_conv2d")(_conv_fake)
    torch.library.register_fake("tdconv::tucker_conv2d")(_conv_fake)

    @torch.library.register_fake("tdconv::factorized_conv2d_prepacked")
    def _prepacked_fake(x, first, spatial, last, bias, stride, padding, dilation, relu, tucker, first_packed,
                        core_packed, last_packed, bias_packed):
        return _conv_fake(x, first, spatial, last, bias, stride, padding, dilation, relu)

    @torch.library.register_fake("tdconv::pack_factors")
    def _pack_factors_fake(first, spatial, last, bias, tucker):
        dtype = torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else first.dtype
        nr = 64 // torch.empty((), dtype=dtype).element_size()

        def panels(n, taps, k):
            return first.new_empty(((n + nr - 1) // nr, taps, k, nr), dtype=dtype)

        core = (panels(spatial.shape[0], spatial.shape[2] * spatial.shape[3], spatial.shape[1]) if tucker
                else first.new_empty((0,), dtype=dtype))
        bias_p = (first.new_empty(((last.shape[0] + nr - 1) // nr * nr,), dtype=dtype) if bias is not None
                  else first.new_empty((0,), dtype=dtype))
        return panels(first.shape[0], 1, first.shape[1]), core, panels(last.shape[0], 1, last.shape[1]), bias_p

    def _setup_context(ctx, inputs, output):
        x, first, spatial, last, bias, stride, padding, dilation, *relu = inputs
        ctx.relu = bool(relu and relu[0])
        # With the ReLU, the gradient passes where the output is positive: its mask is kept.
        ctx.save_for_backward(x, first, spatial, last, output > 0 if ctx.relu else None)
        ctx.has_bias = bias is not None
        ctx.conv = (list(stride), list(padding), list(dilation))

    def _backward_chain(ctx, grad, weight, groups):
        """Gradients of ``last * conv_{weight, groups}(first * x) + bias`` (through the ReLU's mask
        where fused) through ATen ops. The two intermediates are recomputed (cheap next to the
        convolutions' backward) in the input's layout."""
        x, first, _, last, mask = ctx.saved_tensors
        if mask is not None:
            grad = grad * mask
        stride, padding, dilation = ctx.conv
        y1 = F.conv2d(x, first[:, :, None, None])
        y2 = F.conv2d(y1, weight, None, stride, padding, dilation, groups=groups)
        g_bias = grad.sum((0, 2, 3)) if ctx.has_bias else None
        g_last = torch.einsum("nohw,nrhw->or", grad, y2)
        g_y2 = F.conv2d(grad, last.t()[:, :, None, None])
        g_y1, g_weight, _ = torch.ops.aten.convolution_backward(
            g_y2, y1, weight, None, stride, padding, dilation, False, [0, 0], groups, [True, True, False])
        g_first = torch.einsum("nrhw,nihw->ri", g_y1, x)
        g_x = F.conv2d(g_y1, first.t()[:, :, None, None])
        return g_x, g_first, g_weight, g_last, g_bias

    def _cp_backward(ctx, grad):
        spatial = ctx.saved_tensors[2]
        g_x, g_first, g_spatial, g_last, g_bias = _backward_chain(ctx, grad, spatial[:, None], spatial.shape[0])
        return g_x, g_first, g_spatial[:, 0], g_last, g_bias, None, None, None, None

    def _tucker_backward(ctx, grad):
        core = ctx.saved_tensors[2]
        return (*_backward_chain(ctx, grad, core, 1), None, None, None, None)

    torch.library.register_autograd("tdconv::cp_conv2d", _cp_backward, setup_context=_setup_context)
    torch.library.register_autograd("tdconv::tucker_conv2d", _tucker_backward, setup_context=_setup_context)

    # ---- fake kernels of the decomposition engine (shapes only), so that the ops can be traced.
    @torch.library.register_fake("tdconv::cp_als")
    def _cp_als_fake(x, init, n_iter_max, tol, l2_reg, check_every):
        b, rank = x.shape[0], init[0].shape[-1]
        return (x.new_empty((b, rank)), [f.new_empty(f.shape) for f in init],
                x.new_empty((b, n_iter_max), dtype=torch.float64), x.new_empty((b,), dtype=torch.int64))

    @torch.library.register_fake("tdconv::cp_epc")
    def _cp_epc_fake(x, weights, factors, delta, n_iter_max, tol, check_every):
        b = x.shape[0]
        return (weights.new_empty(weights.shape), [f.new_empty(f.shape) for f in factors],
                x.new_empty((b, n_iter_max), dtype=torch.float64), x.new_empty((b,), dtype=torch.int64),
                x.new_empty((b, n_iter_max), dtype=torch.float64))

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
