"""Inference preparation and standard-layer export of a compressed model.

- :func:`optimize_for_inference`: BatchNorm folded into the factorised layer before it, a following ReLU
  fused into the layer's op, every factorised layer's call prepared
  (:meth:`FactorizedConv2d.prepare_for_inference`); eval mode only, the same results up to float
  rounding.
- :func:`to_standard`: every factorised layer replaced by its chain of ``nn.Conv2d`` (and ``nn.ReLU``)
  modules, for runtimes and tools that know no custom op.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn import FactorizedConv2d, FactorizedLinear

__all__ = ["optimize_for_inference", "to_standard", "InferenceReport"]


@dataclass
class InferenceReport:
    """What :func:`optimize_for_inference` did: the names of the layers (factorised or standard convs)
    that absorbed a BatchNorm (``folded``), of the factorised layers that absorbed a ReLU
    (``fused_relu``) and of those prepared, and why the graph rewrite could not run where it could not
    (``skipped``)."""

    folded: list = field(default_factory=list)
    fused_relu: list = field(default_factory=list)
    prepared: list = field(default_factory=list)
    skipped: str | None = None


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with the factorised layers kept as modules (their forward dispatches at run time)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (FactorizedConv2d, FactorizedLinear)) or super().is_leaf_module(m, qualname)


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, torch.nn.functional.relu)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _only_input(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` reads ``source`` as its first argument and nothing else that is a graph value."""
    values = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    return bool(node.args) and node.args[0] is source and values == [source]


def _foldable_bn(bn, layer) -> bool:
    return (type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) and not bn.training and bn.running_mean is not None
            and bn.running_var is not None and bn.num_features == layer.out_channels)


@torch.no_grad()
def _fold_into(module: nn.Module, scaled: nn.Parameter, bn: nn.BatchNorm2d) -> None:
    """Fold the eval-mode ``bn`` that reads ``module``'s output into it: ``scaled`` (the parameter whose
    dim 0 is the output channels: a conv's weight, a factorised layer's last factor) is scaled per
    channel and ``module.bias`` shifted (created where there is none). Computed in float64."""
    dtype = scaled.dtype
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = module.bias.double() if module.bias is not None else torch.zeros_like(shift)
    scaled.copy_((scaled.double() * scale.reshape(-1, 1, 1, 1)).to(dtype))
    new_bias = (bias * scale + shift).to(dtype=dtype, device=scaled.device)
    if module.bias is None:
        module.bias = nn.Parameter(new_bias, requires_grad=scaled.requires_grad)
    else:
        module.bias.copy_(new_bias)


def fold_batchnorm(layer: FactorizedConv2d, bn: nn.BatchNorm2d) -> None:
    """Fold the eval-mode ``bn`` that reads ``layer``'s output into the layer: its last factor is scaled
    per output channel and its bias shifted (a bias is created where the layer had none). Exact in
    eval mode, computed in float64."""
    _fold_into(layer, layer.last, bn)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _plan_rewrite(gm: fx.GraphModule, fold: bool, fuse_relu: bool) -> list:
    """``[(layer node, BatchNorm node or None, ReLU node or None)]``: what can be folded and fused. A
    layer (or a BatchNorm) called more than once cannot absorb (or be absorbed at) one of its calls."""
    modules = dict(gm.named_modules())
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    edits = []
    for node in gm.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if fold and type(layer) is nn.Conv2d and calls[node.target] == 1:  # a standard conv: BatchNorm only
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and calls[users[0].target] == 1 \
                    and _only_input(users[0], node) and _foldable_bn(modules.get(users[0].target), layer):
                edits.append((node, users[0], None))
            continue
        if not isinstance(layer, FactorizedConv2d) or calls[node.target] != 1 or layer.fused_relu:
            continue
        bn_node = relu_node = None
        out = node
        users = list(out.users)
        if fold and len(users) == 1 and users[0].op == "call_module" and calls[users[0].target] == 1 \
                and _only_input(users[0], out) and _foldable_bn(modules.get(users[0].target), layer):
            bn_node = out = users[0]
            users = list(out.users)
        if fuse_relu and len(users) == 1 and _is_relu(users[0], modules) and _only_input(users[0], out):
            relu_node = users[0]
        if bn_node is not None or relu_node is not None:
            edits.append((node, bn_node, relu_node))
    return edits


def _apply_rewrite(gm: fx.GraphModule, edits: list, original: nn.Module | None, report: InferenceReport):
    """Fold and fuse as planned. ``original`` (inplace): the model whose modules ``gm`` shares, whose
    folded BatchNorms become ``nn.Identity`` so that it keeps computing the same function."""
    modules = dict(gm.named_modules())
    for node, bn_node, relu_node in edits:
        layer = modules[node.target]
        if bn_node is not None:
            _fold_into(layer, layer.last if isinstance(layer, FactorizedConv2d) else layer.weight,
                       modules[bn_node.target])
            bn_node.replace_all_uses_with(node)
            gm.graph.erase_node(bn_node)
            report.folded.append(node.target)
            if original is not None:
                parent, _, child = bn_node.target.rpartition(".")
                setattr(original.get_submodule(parent) if parent else original, child, nn.Identity())
        if relu_node is not None:  # (the original's ReLU, if any, then applies to a ReLU's output: no change)
            layer.fused_relu = True
            relu_node.replace_all_uses_with(node)
            gm.graph.erase_node(relu_node)
            report.fused_relu.append(node.target)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.train(False)


def optimize_for_inference(model: nn.Module, *, fold_batchnorm: bool = True, fuse_relu: bool = True,
                           prepack: bool = True, inplace: bool = False, report: bool = False):
    """A copy of the eval-mode ``model`` prepared for fast inference; the same results up to float rounding.

    - **BatchNorm folding** (``fold_batchnorm``): an eval-mode ``nn.BatchNorm2d`` whose only input is a
      factorised layer's output, and which is that output's only reader, is folded into the layer's
      last factor and bias and removed from the graph; one after a standard ``nn.Conv2d`` (the stem,
      1x1 downsample convs, layers left dense) likewise into that conv's weight and bias.
    - **ReLU fusion** (``fuse_relu``): a ReLU (module, ``F.relu``, ``torch.relu`` or ``.relu()``) that is
      the only reader of a factorised layer's output (after folding) is computed by the layer's op
      (``fused_relu=True``) and removed from the graph. A ReLU after a residual addition is not fused.
    - **Prepared calls** (and, with ``prepack``, on the CPU, the factors packed once into the fused
      kernel's panels): every factorised layer keeps the arguments of its op ready
      (:meth:`FactorizedConv2d.prepare_for_inference`); calls under autograd with parameters that
      require grad (``torch.no_grad()`` / ``torch.inference_mode()`` not used) take the ordinary path.
      The packs follow in-place parameter updates, but not edits through ``.data``.

    Both rewrites need a graph: the model is traced with ``torch.fx`` (factorised layers as leaves), and
    a model that has folding or fusion to do comes back as a ``torch.fx.GraphModule`` with the same
    submodule names. A model that torch.fx cannot trace (data-dependent control flow) gets the prepared
    calls only, with a warning that says why. What is not done: a ReLU after a standard ``nn.Conv2d``
    stays (no standard op takes it); a layer or BatchNorm called more than once in the graph absorbs
    or is absorbed nowhere; nothing is folded in training mode.

    Parameters
    ----------
    model : nn.Module
        In eval mode (``model.eval()``): refused otherwise, since BatchNorm folding is exact only there.
    fold_batchnorm, fuse_relu, prepack : bool
    inplace : bool
        Modify ``model``'s own modules instead of a copy's: its factorised layers absorb the folded
        BatchNorms (which ``model`` then holds as ``nn.Identity``) and ReLUs, so that ``model`` keeps its
        function; the graph rewrite still returns a new ``GraphModule`` that shares the modules.
    report : bool
        Also return an :class:`InferenceReport`.

    Returns
    -------
    nn.Module, or ``(nn.Module, InferenceReport)`` when ``report``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("fold_batchnorm", fold_batchnorm), ("fuse_relu", fuse_relu), ("prepack", prepack),
                        ("inplace", inplace), ("report", report)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    training = [name or "the model" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"optimize_for_inference needs a model in eval mode (call model.eval() first); "
                         f"in training mode: {', '.join(training[:5])}" + (" ..." if len(training) > 5 else ""))
    info = InferenceReport()
    if not inplace:
        model = copy.deepcopy(model)
    # (A bare layer has nothing after it to absorb.)
    has_layers = any(isinstance(m, (FactorizedConv2d, nn.BatchNorm2d)) for m in model.modules()) and not isinstance(
        model, (FactorizedConv2d, nn.Conv2d))
    if has_layers and (fold_batchnorm or fuse_relu):
        try:  # only the tracing: the edits are planned, then applied, outside it
            gm = _trace(model)
        except Exception as exc:  # torch.fx raises many types on untraceable code
            info.skipped = f"torch.fx could not trace the model ({type(exc).__name__}: {exc})"
            warnings.warn(f"optimize_for_inference: {info.skipped}; BatchNorm folding and ReLU fusion skipped, "
                          f"the calls are still prepared", stacklevel=2)
        else:
            edits = _plan_rewrite(gm, fold_batchnorm, fuse_relu)
            if edits:
                model = _apply_rewrite(gm, edits, model if inplace else None, info)
    for name, m in model.named_modules():
        if isinstance(m, FactorizedConv2d):
            m.prepare_for_inference(prepack=prepack)
            info.prepared.append(name)
    return (model, info) if report else model


def to_standard(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` with every :class:`FactorizedConv2d` replaced by its chain of standard modules
    (:meth:`FactorizedConv2d.to_chain`: ``nn.Conv2d`` 1x1, the spatial conv(s), ``nn.Conv2d`` 1x1, and
    an ``nn.ReLU`` where the layer has a fused one; an SVD layer's two 1x1 convs) and every
    :class:`FactorizedLinear` by its two ``nn.Linear``: the same function with no custom op, for runtimes
    and tools that know only standard layers. A copy unless ``inplace``; train / eval mode is kept
    per layer. A model that is itself a factorised layer comes back as its chain."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if isinstance(model, (FactorizedConv2d, FactorizedLinear)):
        chain = model.to_chain()
        for p_old, p_new in zip(_chain_params(model), chain.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return chain
    if not inplace:
        model = copy.deepcopy(model)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (FactorizedConv2d, FactorizedLinear))]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        chain = layer.to_chain()
        for p_old, p_new in zip(_chain_params(layer), chain.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        setattr(parent, child, chain)
    return model


def _chain_params(layer: FactorizedConv2d):
    return layer.chain_factors() + ([layer.bias] if layer.bias is not None else [])

