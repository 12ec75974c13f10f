"""Whole-model compression: replace a model's convolutions by :class:`FactorizedConv2d` layers, and
report what it cost and what it saved.

>>> import torchvision, tdconv
>>> model = torchvision.models.resnet18(num_classes=10)
>>> small, report = tdconv.compress(model, "cp", rank=0.5, layers="seed", seed=0)
>>> print(report)                      # per layer and totals (ptflops at 3x32x32)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import sys
import time

import torch
from torch import nn

from . import calibration as cal
from .counting import ptflops_hooks
from .decomposition import decompose_batch, decompose_kernel
from .decomposition.kernels import method_options
from .geometry import ConvGeometry
from .nn import FactorizedConv2d, FactorizedLinear
from .nn.mapping import cp_sensitivity
from .ranks import budget_ranks, data_rank, layer_cost, resolve_rank
from .report import CompressionReport, LayerReport

__all__ = ["compress", "CompressionReport", "LayerReport", "select_layers", "layer_kind", "count_complexity",
           "LAYER_KINDS", "AUTO_METHODS"]

# Convolutions with at most this many input channels are the input ("stem") convs of image models;
# layers=None leaves them dense (see select_layers).
STEM_MAX_IN_CHANNELS = 4

# The layer kinds compress tells apart, and the methods each can take.
LAYER_KINDS = ("conv", "grouped_conv", "pointwise", "linear")
KIND_METHODS = {"conv": ("cp", "cp4", "tucker"), "grouped_conv": ("cp", "cp4", "tucker"), "pointwise": ("svd",),
                "linear": ("svd",)}
# method="auto": Tucker-2 for spatial convs (deterministic, its budget error estimates come from the same
# channel-mode spectra as its fit, fast to compute at any rank, and it keeps the layer's channel
# structure), the truncated SVD (the optimal factorisation of a matrix) for 1x1 convs and linear layers.
AUTO_METHODS = {"conv": "tucker", "grouped_conv": "tucker", "pointwise": "svd", "linear": "svd"}


def _is_seed_layer(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """The seed's choice: ``conv2`` of every ResNet BasicBlock."""
    return name.rpartition(".")[2] == "conv2" and parent is not None and type(parent).__name__ == "BasicBlock"


def layer_kind(module: nn.Module) -> str | None:
    """``"conv"`` (ungrouped, kernel larger than 1x1), ``"grouped_conv"``, ``"pointwise"`` (1x1 conv,
    grouped or not), ``"linear"``, ``"depthwise"`` (one input channel per group: never factorised), or
    None for any other module."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise"
        if tuple(module.kernel_size) == (1, 1):
            return "pointwise"
        return "grouped_conv" if module.groups > 1 else "conv"
    return None


def _why_not(module: nn.Module) -> str | None:
    """Why a conv or linear layer cannot be factorised at all (None when it can)."""
    kind = layer_kind(module)
    if kind == "depthwise":
        return (f"depthwise convolution (groups={module.groups}): one input channel per group leaves no channel mode "
                "to factorise, and its kernel is already the cheapest part of the block")
    base = nn.Linear if kind == "linear" else nn.Conv2d
    if type(module).forward is not base.forward:
        return (f"{type(module).__name__} subclasses {base.__name__} with its own forward (e.g. dynamic padding or "
                "weight standardisation): a factorised layer would not compute its function")
    return None


def select_layers(model: nn.Module, layers=None) -> tuple[list, list]:
    """The layers of ``model`` that ``layers`` selects: ``(selected names, [(name, reason), ...] skipped)``.

    ``layers``:

    - ``None``: every ``nn.Conv2d`` and ``nn.Linear`` (spatial, grouped and 1x1 convs, linear layers)
      except input convs (at most 4 input channels, e.g. the RGB stem): factorising a 3-channel conv
      saves almost nothing and it is the most accuracy-sensitive layer (Kim et al., 2016, leave it
      dense);
    - a list of module names (each must name an ``nn.Conv2d`` or ``nn.Linear``);
    - a callable ``(module, name) -> bool`` over the ``nn.Conv2d`` and ``nn.Linear`` modules;
    - ``"seed"``: ``conv2`` of every ResNet BasicBlock, the seed's choice.

    Selected layers that cannot be factorised (depthwise convs; subclasses with their own forward) are
    skipped with the reason.
    """
    parents = {}
    convs = {}
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = module
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            convs[name] = module
    if layers is None:
        wanted = []
        skipped = []
        for name, m in convs.items():
            if isinstance(m, nn.Conv2d) and m.in_channels <= STEM_MAX_IN_CHANNELS:
                skipped.append((name, f"input conv ({m.in_channels} input channels) left dense"))
                continue
            wanted.append(name)
    elif isinstance(layers, str):
        if layers != "seed":
            raise ValueError(f"layers must be None, 'seed', a list of module names or a callable, got {layers!r}")
        wanted = [n for n, m in convs.items() if _is_seed_layer(n, m, parents.get(n))]
        skipped = []
    elif callable(layers):
        wanted = [n for n, m in convs.items() if layers(m, n)]
        skipped = []
    else:
        try:
            names = list(layers)
        except TypeError:
            raise TypeError(f"layers must be None, 'seed', a list of module names or a callable, got "
                            f"{type(layers).__name__}") from None
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ValueError(f"layers names modules that the model does not have: {unknown}")
        not_conv = [n for n in names if not isinstance(modules[n], (nn.Conv2d, nn.Linear))]
        if not_conv:
            raise ValueError(f"layers names modules that are not nn.Conv2d or nn.Linear: "
                             f"{[(n, type(modules[n]).__name__) for n in not_conv]}")
        wanted = list(dict.fromkeys(names))
        skipped = []
    selected = []
    for name in wanted:
        reason = _why_not(convs[name])
        if reason is None and isinstance(parents.get(name), nn.MultiheadAttention):
            reason = "projection of an nn.MultiheadAttention, which reads its weight directly instead of calling it"
        if reason is None and not bool(convs[name].weight.detach().ne(0).any()):
            reason = "all-zero weight: nothing to factorise"
        if reason:
            skipped.append((name, reason))
        else:
            selected.append(name)
    return selected, skipped


def _method_spec(method, explicit_layers: bool = False):
    """``method`` checked: a method name, "auto", a mapping from layer kind to method (or None), or a
    callable ``(module, name)``. Returns ``(description for the report, function (name, module, kind) -> method or None)``."""
    from .ranks import METHODS
    if isinstance(method, str):
        if method == "auto":
            return "auto", lambda name, module, kind: AUTO_METHODS[kind]
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, 'auto', a dict from layer kind {LAYER_KINDS} to "
                             f"method, or a callable (module, name) -> method; got {method!r}")
        if method == "svd":
            return method, lambda name, module, kind: "svd" if kind in ("pointwise", "linear") else None
        # A spatial-conv method names how spatial convs are factorised; 1x1 convs and linear layers (matrices,
        # whose factorisation is the SVD) are left to method="auto", "svd" or a dict, so that ranks meant for
        # the spatial convs (a Tucker pair, a CP rank above the channels) never land on them.
        # (A 1x1 conv named explicitly by ``layers`` takes it too, as a Tucker-2 or CP of its kernel.)
        spatial = ("conv", "grouped_conv", "pointwise") if explicit_layers else ("conv", "grouped_conv")
        return method, lambda name, module, kind: method if kind in spatial else None
    if isinstance(method, dict):
        bad = [k for k in method if k not in LAYER_KINDS]
        if bad:
            raise ValueError(f"method maps unknown layer kinds {bad}; the kinds are {LAYER_KINDS}")
        for kind, m in method.items():
            m = AUTO_METHODS[kind] if m == "auto" else m
            if m is not None and m not in KIND_METHODS[kind]:
                raise ValueError(f"method[{kind!r}] must be one of {KIND_METHODS[kind]} or None, got {m!r}")
        table = {k: (AUTO_METHODS[k] if m == "auto" else m) for k, m in method.items()}
        desc = ",".join(f"{k}={v}" for k, v in table.items())
        return desc, lambda name, module, kind: table.get(kind)
    if callable(method):
        def call(name, module, kind):
            m = method(module, name)
            m = AUTO_METHODS[kind] if m == "auto" else m
            if m is not None and m not in KIND_METHODS[kind]:
                raise ValueError(f"method({name!r}) returned {m!r} for a {kind} layer; expected one of "
                                 f"{KIND_METHODS[kind]}, 'auto' or None")
            return m
        return "per-layer", call
    raise TypeError(f"method must be a str, a dict from layer kind to method or a callable, got "
                    f"{type(method).__name__}")


def _input_sizes(model: nn.Module, names: list, input_size: tuple) -> dict:
    """The (H, W) each named module sees for one input of ``input_size`` (a forward pass with hooks)."""
    sizes = {}
    modules = dict(model.named_modules())
    def record(name):
        def hook(module, inputs, output):  # returns None: the output is left alone
            x = inputs[0]
            if isinstance(module, nn.Linear):  # its rows per image, as the 1x1 conv it is priced as
                sizes.setdefault(name, (math.prod(x.shape[1:-1]), 1))
            else:
                sizes.setdefault(name, tuple(x.shape[2:]))
        return hook

    hooks = [modules[n].register_forward_hook(record(n)) for n in names]
    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sizes


def count_complexity(model: nn.Module, input_size=(3, 32, 32)) -> tuple[int, int]:
    """(MACs, parameters) of one input of ``input_size``, counted by ptflops (``backend="pytorch"``,
    functional calls not counted, as the seed counted them), with :class:`FactorizedConv2d` counted as
    its three convolutions."""
    try:
        import ptflops
    except ImportError as exc:
        raise ImportError("counting MACs needs ptflops: pip install ptflops") from exc

    model = copy.deepcopy(model).cpu().float()
    macs, params = ptflops.get_model_complexity_info(
        model, tuple(input_size), as_strings=False, print_per_layer_stat=False, verbose=False, backend="pytorch",
        backend_specific_config={"count_functional": False}, custom_modules_hooks=ptflops_hooks())
    if macs is None or params is None:  # ptflops reports a failed forward by printing it and returning None
        raise RuntimeError(f"ptflops could not count the model at input_size={tuple(input_size)}: its forward "
                           "failed under the counter (run the model on an input of that size to see why)")
    return int(macs), int(params)


def _layer_report(name, conv, layer, kernel, hw, seconds) -> LayerReport:
    w = conv.weight.detach()
    wn = float(w.double().norm())
    err = float((kernel.double() - w.double()).norm()) / wn if wn > 0 else float("nan")
    macs_after = layer.macs(hw[0]) if isinstance(layer, FactorizedLinear) else layer.macs(hw)
    rep = LayerReport(name=name, kernel_shape=list(w.shape), method=layer.method,
                      rank=list(layer.rank) if isinstance(layer.rank, tuple) else layer.rank,
                      params_before=sum(p.numel() for p in conv.parameters()),
                      params_after=sum(p.numel() for p in layer.parameters()),
                      macs_before=layer_cost(ConvGeometry.of(conv), "dense", None, "macs", hw),
                      macs_after=macs_after, rel_error=err, seconds=seconds, kernel_norm=wn)
    if layer.method in ("cp", "cp4"):
        norms = layer.component_norms().double()
        rep.max_component_norm = float(norms.max())
        rep.min_component_norm = float(norms.min())
        rep.norm_ratio = float(norms.square().sum()) / wn ** 2 if wn > 0 else float("nan")
        rep.sensitivity = cp_sensitivity(layer.method, layer.first, layer.spatial, layer.last,
                                         getattr(layer, "spatial_w", None), wn, layer.groups)
    return rep


def _progress(enabled, i, n, name, t0):
    if enabled:
        bar = "#" * int(20 * i / n)
        sys.stderr.write(f"\rtdconv.compress [{bar:<20}] {i}/{n} {name[:40]:<40} {time.perf_counter() - t0:6.1f}s")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()


def compress(model: nn.Module, method="auto", rank=0.5, *, layers=None, overrides: dict | None = None,
             target_macs: float | None = None, target_params: float | None = None, min_rank: float = 0.0,
             inplace: bool = False,
             bias: bool | None = None, input_size=(3, 32, 32), progress: bool | None = None,
             calibration=None, sequential: bool = True, refine_steps: int = 0, reestimate_bn="auto",
             **decomposition_options):
    """Replace convolutions and linear layers of ``model`` by factorised layers
    (:class:`FactorizedConv2d`, :class:`FactorizedLinear`).

    Parameters
    ----------
    model : nn.Module
    method : str, dict or callable
        How each kind of layer is factorised (kinds: ``"conv"``, a spatial conv; ``"grouped_conv"``;
        ``"pointwise"``, a 1x1 conv; ``"linear"``; see :func:`layer_kind`):

        - ``"auto"`` (the default): ``{"conv": "tucker", "grouped_conv": "tucker", "pointwise": "svd",
          "linear": "svd"}`` (:data:`AUTO_METHODS`; why Tucker-2: deterministic, budget estimates that are
          tight for it, fast at any rank; the truncated SVD is the optimal factorisation of a matrix);
        - ``"cp"``, ``"cp4"`` or ``"tucker"``: that method for spatial convs (grouped ones per group) only;
          1x1 convs and linear layers stay dense (so that ranks meant for the spatial convs, a Tucker
          pair or a CP rank above the channels, never apply to them), except 1x1 convs that ``layers``
          names or selects;
        - ``"svd"``: 1x1 convs and linear layers only;
        - a dict from kind to method (or None: leave that kind dense); kinds it does not name stay dense;
        - a callable ``(module, name) -> method or None``, per layer (the argument order of
          ``layers``' callable).

        Depthwise convs always stay dense (the report says why).
    rank : int, (int, int), float or str
        For every selected layer: a CP or SVD rank, Tucker ranks ``(R_out, R_in)``, a fraction of the
        channels (0.5: the seed's rank C/2; an SVD rank: of the smaller channel count), ``"evbmf"``
        (the analytic EVBMF rank of the mode-0 and mode-1 unfoldings, as Kim et al. 2016 and the seed
        chose Tucker ranks; CP takes the larger), or ``"energy=0.9"`` (the smallest ranks whose mode
        singular values keep that fraction of the energy). Must fit every selected layer (a CP rank is
        any positive int; Tucker and SVD ranks at most the layer's channels; a grouped layer's ranks
        multiples of its groups). A layer whose factorised form at its rank would not cost fewer
        parameters and MACs than the dense layer is left dense, with the reason in the report (unless
        ``layers`` is a list that names it: that is done as asked).
    layers : None, "seed", list of names, or callable ``(module, name) -> bool``
        Which layers; see :func:`select_layers`. Selected layers that cannot be factorised are skipped
        and listed in the report with the reason. With ``layers=None``, layers that a forward pass at
        ``input_size`` does not call are left dense too (their input size is unknown).
    overrides : dict, optional
        Module name -> rank, for those layers instead of ``rank`` (or of the budget's choice).
    target_macs, target_params : float in (0, 1], optional
        A whole-model budget, as a fraction of the model's MACs at ``input_size`` or of its
        parameters: per-layer ranks are chosen over every selected layer, of every kind, to meet it (at
        or under, within 2 %) while keeping the sum of the layers' normalised errors small (see
        :mod:`tdconv.ranks`); a layer may also be left dense where that serves the budget best.
        ``rank`` is then not used. At most one of the two.
    min_rank : float in [0, 1)
        With a budget: no layer gets ranks below this fraction of its channels. The budget objective
        (the sum of the layers' estimated normalised errors) is concave along a layer whose singular
        values are flat (untrained or barely trained weights), and is then met by factorising some
        layers well and leaving others at rank 1; a floor such as 0.125 prevents that.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.
    bias : None or True
        None keeps each conv's bias (or its lack); True gives every factorised layer a bias
        (zero-initialised; the function is unchanged). The seed's factorised layers had one, and its
        complexity figures count it.
    input_size : (C, H, W)
        Input of the MAC counts in the report (the seed's 3x32x32 by default).
    progress : bool, optional
        A progress line on stderr (default: when stderr is a terminal and more than 4 layers).
    calibration : tensor [N, C, H, W] or iterable of batches, optional
        Inputs as the model sees them (normalised; tensors or ``(inputs, labels)`` tuples, labels
        ignored). Each layer is then fitted to its output on these inputs instead of to its kernel (see
        :mod:`tdconv.calibration`); the last 1/8 of the images are held out to measure the fits. The
        batches are moved to the model's device and dtype. With a budget, the ranks come from the
        layers' output-error spectra on the data.
    sequential : bool
        With calibration: fit the layers in forward order, each on the inputs the already compressed
        model gives it, against the dense model's outputs (default); False fits each layer on the
        dense model's inputs.
    refine_steps : int
        With calibration: after the layers of a block (the parent module of factorised layers, a
        residual block in a ResNet) are fitted, this many Adam steps on the block's output error
        against the dense model on the calibration images, updating the block's factorised layers and
        BatchNorm affine parameters; kept only where the held-out error goes down. 0: off.
    reestimate_bn : "auto", bool
        With calibration: re-estimate every BatchNorm's statistics on the calibration images after the
        fits; ``"auto"`` does so only where that lowers the model's output error on the held-out images.
    **decomposition_options
        Passed to :func:`tdconv.decomposition.decompose_kernel` (``n_iter_max``, ``tol``, ``init``, ``seed``,
        ``epc``, ...). ``seed`` is accepted for every method; Tucker (HOSVD-initialised HOOI) does not use it.

    Returns
    -------
    (nn.Module, CompressionReport)
        The compressed model, on the original device and dtype, and the report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    method_desc, method_of = _method_spec(method, explicit_layers=layers is not None)
    if overrides is not None and not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict from module name to rank, got {type(overrides).__name__}")
    if not (isinstance(input_size, (tuple, list)) and len(input_size) == 3
            and all(isinstance(v, numbers.Integral) and v >= 1 for v in input_size)):
        raise ValueError(f"input_size must be (C, H, W) of positive ints, got {input_size!r}")
    if bias not in (None, True, False):
        raise ValueError(f"bias must be None (keep each conv's), True (a bias on every factorised layer) or False "
                         f"(only where no conv has one), got {bias!r}")
    if target_macs is not None and target_params is not None:
        raise ValueError("give at most one of target_macs and target_params")
    metric, target = ("macs", target_macs) if target_macs is not None else ("params", target_params)
    if target is not None and (isinstance(target, bool) or not isinstance(target, numbers.Real)
                               or not 0.0 < target <= 1.0):
        raise ValueError(f"target_{metric} must be a fraction in (0, 1] of the model's {metric}, got {target!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, numbers.Real) or not 0.0 <= min_rank < 1.0:
        raise ValueError(f"min_rank must be a fraction in [0, 1) of the channels, got {min_rank!r}")
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be a bool, got {type(sequential).__name__}")
    if reestimate_bn not in ("auto", True, False):
        raise ValueError(f"reestimate_bn must be 'auto', True or False, got {reestimate_bn!r}")
    cal.positive_steps(refine_steps, "refine_steps")
    if calibration is None and refine_steps:
        raise ValueError("refine_steps needs calibration data (calibration=...)")
    selected, skipped = select_layers(model, layers)
    modules = dict(model.named_modules())
    methods, kept = {}, []
    for name in selected:
        kind = layer_kind(modules[name])
        m = method_of(name, modules[name], kind)
        if m is None:
            hint = (" (method='auto' or {'%s': 'svd'} factorises it by SVD)" % kind
                    if kind in ("pointwise", "linear") and method_desc != "svd" else "")
            skipped.append((name, f"left dense: method={method_desc} gives no method for this {kind} layer{hint}"))
        else:
            methods[name] = m
            kept.append(name)
    selected = kept
    taken = set().union(*(method_options(m) for m in set(methods.values()))) if methods else {"seed"}
    unknown = sorted(set(decomposition_options) - taken)
    if unknown:
        raise TypeError(f"unexpected decomposition options {unknown} for the methods in use "
                        f"{sorted(set(methods.values()))} (allowed: {sorted(taken)})")
    if overrides:
        unknown = sorted(set(overrides) - set(selected))
        if unknown:
            raise ValueError(f"overrides names layers that are not selected for factorisation: {unknown} "
                             f"(selected: {selected})")
    if not selected:
        raise ValueError("the model has no layer to factorise with layers="
                         f"{layers!r} and method={method_desc}" + (f" (skipped: {skipped})" if skipped else ""))
    if bias is False:
        with_bias = [n for n in selected if modules[n].bias is not None]
        if with_bias:
            raise ValueError(f"bias=False would drop the bias of {with_bias} and change the model's function; "
                             "use bias=None")
    # Every rank is checked before any decomposition runs.
    ranks = {}
    for name in selected:
        conv = modules[name]
        g = ConvGeometry.of(conv)
        if target is not None and name not in (overrides or {}):
            continue  # chosen by the budget below
        r = overrides.get(name, rank) if overrides else rank
        try:
            if isinstance(r, str):
                r = data_rank(r, conv.weight, methods[name], g.groups)
            ranks[name] = resolve_rank(r, methods[name], g.out_channels, g.in_channels, g.groups)
        except ValueError as exc:
            raise ValueError(f"rank for layer {name!r} ({methods[name]}, {g.out_channels}x{g.in_channels}"
                             + (f", groups={g.groups}" if g.groups > 1 else "") + f"): {exc}") from None
    sizes = _input_sizes(model, selected, input_size)
    if layers is None:  # the automatic choice leaves uncalled layers alone (e.g. weights read, not called)
        for name in [n for n in selected if n not in sizes]:
            skipped.append((name, "left dense: not called by a forward pass at input_size"))
            selected.remove(name)
            ranks.pop(name, None)
        if not selected:
            raise ValueError("no selected layer is called by a forward pass at input_size"
                             + (f" (skipped: {skipped})" if skipped else ""))
    # A layer whose factorised form costs at least the dense one (parameters or MACs) stays dense, unless
    # ``layers`` names it: that is honoured as asked.
    named = layers is not None and not isinstance(layers, str) and not callable(layers)
    for name in [] if named else list(ranks):
        g = ConvGeometry.of(modules[name])
        factorised = dataclasses.replace(g, bias=g.bias or bias is True)
        costs = [("parameters", layer_cost(factorised, methods[name], ranks[name], "params"),
                  layer_cost(g, "dense", None, "params"))]
        if name in sizes:
            costs.append(("MACs", layer_cost(factorised, methods[name], ranks[name], "macs", sizes[name]),
                          layer_cost(g, "dense", None, "macs", sizes[name])))
        worse = [f"{what} {after} >= {dense}" for what, after, dense in costs if after >= dense]
        if worse:
            r = ranks.pop(name)
            skipped.append((name, f"left dense: {methods[name]} at rank {r} would not be cheaper ("
                                  + ", ".join(worse) + ")"))
            selected.remove(name)
    if not selected:
        raise ValueError(f"no selected layer is cheaper factorised at rank={rank!r} (skipped: {skipped})")
    before = count_complexity(model, input_size)
    show = progress if progress is not None else (sys.stderr.isatty() and len(selected) > 4)
    fitter = None
    if calibration is not None:
        seed = decomposition_options.get("seed")
        fitter = cal.SequentialFit(model, selected, calibration, input_size=tuple(input_size), sequential=sequential,
                                   refine_steps=refine_steps, reestimate_bn=reestimate_bn,
                                   seed=0 if seed is None else seed)
    try:
        if target is not None:
            total = before[0] if metric == "macs" else before[1]
            priced = {}
            for name in selected:
                conv = modules[name]
                if name not in sizes:
                    raise ValueError(f"layer {name!r} is not reached by a forward pass at input_size; a budget needs "
                                     "every selected layer's input size")
                dense = ConvGeometry.of(conv)
                factorised = dataclasses.replace(dense, bias=dense.bias or bias is True)  # the layer from_conv makes
                priced[name] = (factorised, sizes[name], layer_cost(dense, "dense", None, metric, sizes[name]),
                                conv.weight, methods[name])
            free = [n for n in selected if n not in (overrides or {})]
            tails = fitter.tails(free) if fitter is not None else None
            chosen = budget_ranks(priced, None, total, metric, target, min_rank,
                                  fixed={n: ranks[n] for n in (overrides or {}) if n in ranks}, tails=tails)
            for name, r in chosen.items():
                if r is None:
                    skipped.append((name, f"left dense by the budget (target_{metric}={target}): its dense form "
                                          "served the budget better than any rank cheaper than it"))
                    selected.remove(name)
                else:
                    ranks[name] = r
            if fitter is not None:
                fitter.drop([n for n, r in chosen.items() if r is None])
        report = CompressionReport(method=method_desc, input_size=tuple(input_size), skipped=skipped)
        if fitter is None:
            new_layers = _kernel_fits(model, selected, methods, ranks, bias, sizes, report, show,
                                      decomposition_options)
        else:
            student, new_layers = _data_fits(fitter, model, methods, ranks, bias, sizes, report, show,
                                             decomposition_options)
    finally:
        if fitter is not None:
            fitter.restore_teacher()
    # Every layer is built before the model is touched: an error leaves ``model`` as it was.
    if fitter is not None and not inplace:
        out = student
    else:
        out = model if inplace else copy.deepcopy(model)
        out_modules = dict(out.named_modules())
        saved = ({n: out_modules[n] for n in new_layers}, copy.deepcopy(out.state_dict()) if fitter is not None
                 else None) if inplace else None
        for name, layer in new_layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(out_modules[parent_name] if parent_name else out, child, layer)
        if fitter is not None:
            out.load_state_dict(student.state_dict())  # BatchNorm statistics and refined parameters
    if fitter is not None:
        flags = {n: m.training for n, m in model.named_modules()}
        for n, m in out.named_modules():
            if n in flags:
                m.training = flags[n]
    report.macs_before, report.params_before = before
    try:
        report.macs_after, report.params_after = count_complexity(out, input_size)
    except Exception:
        if inplace and saved is not None:  # the model as it was
            originals, state = saved
            for name, module in originals.items():
                parent_name, _, child = name.rpartition(".")
                setattr(out.get_submodule(parent_name) if parent_name else out, child, module)
            if state is not None:
                out.load_state_dict(state)
        raise
    return out, report


def _options(method, options) -> dict:
    """The decomposition options that ``method`` takes (compress checked that each is taken by one)."""
    allowed = method_options(method)
    return {k: v for k, v in options.items() if k in allowed}


def _built_layer(conv, method, rank, bias, options, decomposition=None):
    if decomposition is not None:
        return FactorizedConv2d.from_decomposition(conv, method, decomposition, bias=bias).train(conv.training)
    if isinstance(conv, nn.Linear):
        decomposition = decompose_kernel(conv.weight.detach(), "svd", rank, **_options("svd", options))
        return FactorizedLinear.from_decomposition(conv, "svd", decomposition, bias=bias).train(conv.training)
    decomposition = decompose_kernel(conv.weight.detach(), method, rank, groups=conv.groups,
                                     **_options(method, options))
    return FactorizedConv2d.from_decomposition(conv, method, decomposition, bias=bias).train(conv.training)


def _check_finite(layer, name):
    with torch.no_grad():
        kernel = layer.kernel()
    if not bool(torch.isfinite(kernel).all()):
        raise RuntimeError(f"the decomposition of layer {name!r} produced a non-finite kernel; the model is "
                           "unchanged")
    return kernel


def _report_layer(report, name, conv, layer, sizes, seconds, **extra):
    """The layer's kernel checked (finite) and, where it is reached at input_size, reported."""
    kernel = _check_finite(layer, name)
    hw = sizes.get(name)
    if hw is None:
        report.skipped.append((name, "not reached by a forward pass at input_size; factorised, not reported"))
        return
    rep = _layer_report(name, conv, layer, kernel, hw, seconds)
    for k, v in extra.items():
        setattr(rep, k, v)
    report.layers.append(rep)


def _batched_decompositions(modules, selected, methods, ranks, options) -> tuple[dict, dict]:
    """The decompositions of the layers that share a kernel shape, method and rank, computed by one batched
    engine call per such group (:func:`tdconv.decompose_batch`: on a GPU, one sequence of launches for the
    group instead of one per layer; resnet18's 3x3 convs form 4 groups). Each equals the layer's own
    :func:`decompose_kernel` result up to rounding (with ``seed=None``, a CP group draws one random seed
    where the layers would each draw their own). Returns ({name: decomposition}, {name: seconds}), the
    seconds being the group's time shared equally."""
    groups: dict = {}
    for name in selected:
        conv, method = modules[name], methods[name]
        if isinstance(conv, nn.Linear) or conv.groups != 1 or method not in ("cp", "cp4", "tucker"):
            continue
        w = conv.weight
        rank = tuple(ranks[name]) if method == "tucker" else ranks[name]
        groups.setdefault((method, tuple(w.shape), w.dtype, w.device, rank), []).append(name)
    found, seconds = {}, {}
    for (method, shape, _, _, rank), names in groups.items():
        if len(names) < 2:
            continue
        c_out, c_in, kh, kw = shape
        ws = [modules[n].weight.detach() for n in names]
        opts = _options(method, options)
        t = time.perf_counter()
        try:
            if method == "tucker":
                out = decompose_batch(ws, "hooi", rank, modes=(0, 1), **{k: v for k, v in opts.items() if k != "seed"})
            else:
                xs = [w.reshape(c_out, c_in, kh * kw) for w in ws] if method == "cp" else ws
                out = decompose_batch(xs, "cp", rank, **opts)
        except RuntimeError as exc:  # e.g. out of memory stacking the group: say which layers, keep the type
            exc.add_note(f"tdconv.compress: while decomposing layers {names} together")
            raise
        share = (time.perf_counter() - t) / len(names)
        for n, d in zip(names, out):
            found[n], seconds[n] = d, share
    return found, seconds


def _kernel_fits(model, selected, methods, ranks, bias, sizes, report, show, options) -> dict:
    """Each layer fitted to its kernel; layers of one shape, method and rank in one batched call."""
    modules = dict(model.named_modules())
    new_layers = {}
    t0 = time.perf_counter()
    try:
        batched, shared = _batched_decompositions(modules, selected, methods, ranks, options)
    except ValueError:
        batched, shared = {}, {}  # each layer on its own below, which names the layer in the error
    for i, name in enumerate(selected):
        _progress(show, i, len(selected), name, t0)
        t = time.perf_counter()
        try:
            new_layers[name] = layer = _built_layer(modules[name], methods[name], ranks[name], bias, options,
                                                    batched.get(name))
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
        _report_layer(report, name, modules[name], layer, sizes, time.perf_counter() - t + shared.get(name, 0.0))
    _progress(show, len(selected), len(selected), "done", t0)
    return new_layers


def _data_fit(fitter, name, conv, method, rank, bias, options, student):
    """The layer fitted on the calibration data, and what the report says about it."""
    m = fitter.moments(name, student if fitter.sequential else None, fitter.fit_batches)
    cal.check_sample_count(name, m)
    held = (fitter.moments(name, student if fitter.sequential else None, fitter.held_batches)
            if fitter.held_batches else None)
    scale = fitter.scales.get(name)
    layer = _built_layer(conv, method, rank, bias, options)
    with_bias = layer.bias is not None
    candidates = {"kernel": cal.LayerFit.of_layer(layer)}
    if method == "svd":
        candidates["data"] = cal.fit_svd(m, layer.rank, scale, with_bias)
    elif method == "tucker":
        candidates["data"] = cal.fit_tucker(m, layer.rank, scale, with_bias)
    else:
        kh, kw = conv.kernel_size
        live = m.ss.diagonal()[:-1].reshape(conv.in_channels, kh * kw).sum(0) > 0
        start = candidates["kernel"]
        if not bool(live.all()) and bool(live.any()):  # no rank spent on taps that only read padding
            masked = conv.weight.detach() * live.reshape(1, 1, kh, kw).to(conv.weight)
            start = cal.LayerFit.of_layer(FactorizedConv2d.from_decomposition(
                conv, method, decompose_kernel(masked, method, rank, **_options(method, options)), bias=bias))
        candidates["data"] = cal.fit_cp(m, start, scale, with_bias)
    c_out = ConvGeometry.of(conv).out_channels
    kernels = {k: f.kernel_aug(c_out) for k, f in candidates.items()}
    errors = {k: cal.output_error(m, k_aug, scale) for k, k_aug in kernels.items()}
    held_errors = {k: cal.output_error(held, k_aug, scale) for k, k_aug in kernels.items()} if held else None
    # The data fit is kept where it is better on the calibration images and on the held-out ones (an
    # overfitted fit, from too few images, loses on the latter).
    better = errors["data"] < errors["kernel"] and (held_errors is None or held_errors["data"] < held_errors["kernel"])
    best = "data" if better else "kernel"
    with torch.no_grad():
        for pname, value in candidates[best].parameters_for(layer).items():
            getattr(layer, pname).copy_(value)
    info = {"fit": "data" if better else "kernel (better on the calibration or held-out images)",
            "output_error": errors[best], "kernel_fit_output_error": errors["kernel"]}
    if held_errors is not None:
        info["held_out_error"] = held_errors[best]
        info["kernel_fit_held_out_error"] = held_errors["kernel"]
    return layer, info


def _data_fits(fitter, model, methods, ranks, bias, sizes, report, show, options) -> tuple:
    """Each layer fitted on the calibration data, in forward order; returns the student and its layers."""
    modules = dict(model.named_modules())
    student = copy.deepcopy(model).eval()
    s_modules = dict(student.named_modules())
    names = fitter.order + list(fitter.kernel_only)
    last_of_block = {name.rpartition(".")[0]: name for name in fitter.order}
    new_layers, refined = {}, []
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        _progress(show, i, len(names), name, t0)
        conv = modules[name]
        t = time.perf_counter()
        if name in fitter.kernel_only:
            layer = _built_layer(conv, methods[name], ranks[name], bias, options)
            info = {"fit": f"kernel ({fitter.kernel_only[name]})"}
        else:
            with torch.no_grad():
                layer, info = _data_fit(fitter, name, conv, methods[name], ranks[name], bias, options, student)
        parent, _, child = name.rpartition(".")
        setattr(s_modules[parent] if parent else student, child, layer)
        new_layers[name] = layer
        _report_layer(report, name, conv, layer, sizes, time.perf_counter() - t, **info)
        if fitter.refine_steps and parent and name in fitter.order and last_of_block.get(parent) == name:
            refined.append(fitter.refine(parent, student))
            if refined[-1]["kept"]:  # the errors above are those before the refinement
                for rep in report.layers:
                    if rep.name.rpartition(".")[0] == parent:
                        rep.fit += " + block refinement (errors before it)"
    _progress(show, len(names), len(names), "done", t0)
    bn = fitter.decide_batchnorm(student)
    report.calibration = {"images": fitter.images, "held_out_images": fitter.held_images,
                          "sequential": fitter.sequential, "batchnorm": bn, "refine": refined,
                          "seconds": time.perf_counter() - t0}
    return student, new_layers
