"""MACs and FLOPs of the fused ops as the counters users run see them.

- ``torch.utils.flop_counter.FlopCounterMode`` counts ``tdconv::cp_conv2d``, ``tdconv::tucker_conv2d``
  and ``tdconv::factorized_conv2d_prepacked`` (formulas registered when the extension loads): 2 FLOPs
  per multiply-accumulate of the chain of three convolutions the op computes, bias and ReLU not
  counted, as torch counts ``aten.convolution``. For a CP-4 layer the op computes the kh x kw product
  of its two 1-D filters, and that is what is counted (its ``to_chain`` has the two 1-D convolutions,
  kh + kw per channel and pixel).
- ptflops: :func:`ptflops_hooks` for its module backend (``backend="pytorch"``) and
  :func:`ptflops_aten_hooks` for its aten backend, so that a compressed model is counted as the chain
  of convolutions it computes (:meth:`FactorizedConv2d.to_chain`), not as zero::

      ptflops.get_model_complexity_info(model, (3, 32, 32), backend="pytorch",
                                        custom_modules_hooks=tdconv.ptflops_hooks())
      ptflops.get_model_complexity_info(model, (3, 32, 32), backend="aten",
                                        custom_modules_hooks=tdconv.ptflops_aten_hooks())
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _ext
from .utils import conv_output_size

__all__ = ["fused_conv_macs", "ptflops_hooks", "ptflops_aten_hooks"]

# torch's own F.relu: ptflops' module backend replaces it by a counting wrapper while it counts with
# count_functional=True (its default).
_TORCH_RELU = F.relu


def fused_conv_macs(x_shape, first_shape, spatial_shape, last_shape, stride, padding, dilation,
                    bias: bool = False) -> int:
    """Multiply-accumulates of one call of a fused op on an input of ``x_shape`` [N, C_in, H, W]:
    those of its chain (1x1 conv on the input, the spatial conv on the output grid, 1x1 conv back),
    plus one per output element for the bias where ``bias`` (as ptflops counts a conv's bias).
    ``spatial_shape`` is [R, kh, kw] (CP) or [R_out, R_in, kh, kw] (Tucker-2)."""
    n, c_in, h, w = (int(v) for v in x_shape)
    r_in, c_out = int(first_shape[0]), int(last_shape[0])
    r_out = int(last_shape[1])
    ho, wo = conv_output_size((h, w), tuple(int(v) for v in spatial_shape[-2:]), tuple(stride), tuple(padding),
                              tuple(dilation))
    spatial = math.prod(int(v) for v in spatial_shape)
    macs = n * (h * w * c_in * r_in + ho * wo * spatial + ho * wo * r_out * c_out)
    return macs + (n * c_out * ho * wo if bias else 0)


def ptflops_hooks() -> dict:
    """``custom_modules_hooks`` for ptflops' module backend: each :class:`FactorizedConv2d` is counted as
    ptflops counts its chain of ``nn.Conv2d`` (and the ``nn.ReLU`` of a fused ReLU), each
    :class:`FactorizedLinear` as its two ``nn.Linear``, a :class:`LiveTapConv2d` as the ``nn.Conv2d``
    it computes."""
    try:
        from ptflops.pytorch_ops import MODULES_MAPPING
    except ImportError as exc:
        raise ImportError("ptflops_hooks needs ptflops: pip install ptflops") from exc
    from torch import nn

    from .nn import FactorizedConv2d, FactorizedLinear, LiveTapConv2d

    def factorized_hook(module, inputs, output):
        x = inputs[0]
        macs = module.macs(tuple(x.shape[2:])) * x.shape[0]
        if module.fused_relu:  # as ptflops counts the chain's nn.ReLU: one per output element
            macs += output.numel()
            if F.relu is not _TORCH_RELU:  # ptflops' functional counting is on: it counts that ReLU's F.relu too
                macs += output.numel()
        module.__flops__ += int(macs)

    def linear_hook(module, inputs, output):  # as ptflops counts its two nn.Linear
        x = inputs[0]
        module.__flops__ += int(module.macs(1) * math.prod(x.shape[:-1]))

    return {FactorizedConv2d: factorized_hook, FactorizedLinear: linear_hook, LiveTapConv2d: MODULES_MAPPING[nn.Conv2d]}


def _op_macs(args, outputs) -> int:
    x, first, spatial, last, bias, stride, padding, dilation = args[:8]
    return fused_conv_macs(x.shape, first.shape, spatial.shape, last.shape, stride, padding, dilation,
                           bias is not None)


def ptflops_aten_hooks() -> dict:
    """``custom_modules_hooks`` for ptflops' aten backend (``backend="aten"``): the fused ops counted as
    that backend counts the chain of ``aten.convolution`` calls they compute (bias included, ReLU not,
    as it does; a CP-4 layer with its kh x kw product filter, see the module docstring)."""
    if not _ext.has_ext():
        return {}
    return {torch.ops.tdconv.cp_conv2d: _op_macs, torch.ops.tdconv.tucker_conv2d: _op_macs,
            torch.ops.tdconv.factorized_conv2d_prepacked: _op_macs}


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    def formula(x_shape, first_shape, spatial_shape, last_shape, _bias, stride, padding, dilation, *args,
                out_shape=None, **kwargs) -> int:
        return 2 * fused_conv_macs(x_shape, first_shape, spatial_shape, last_shape, stride, padding, dilation)

    register_flop_formula([torch.ops.tdconv.cp_conv2d, torch.ops.tdconv.tucker_conv2d,
                           torch.ops.tdconv.factorized_conv2d_prepacked])(formula)


if _ext.has_ext():
    _register_flop_formulas()
