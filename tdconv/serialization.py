"""Saving and loading compressed models: the architecture changes travel with the weights.

``tdconv.save(model, path)`` writes which modules are factorised layers (:class:`FactorizedConv2d`,
:class:`FactorizedLinear`) and their constructor arguments, next to the state dict. ``tdconv.load(path, model=base)`` rebuilds those layers
in ``base`` (the uncompressed architecture, e.g. ``torchvision.models.resnet18(num_classes=10)``) and
loads the weights. Files are read with ``torch.load(weights_only=True)``: plain containers and tensors
only, never code.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .nn import FactorizedConv2d, FactorizedLinear
from .utils import atomic_save

__all__ = ["save", "load"]

FORMAT = "tdconv.compressed"
VERSION = 1


def _layer_specs(model: nn.Module) -> dict:
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, (FactorizedConv2d, FactorizedLinear))}


def save(model: nn.Module, path, meta: dict | None = None) -> None:
    """Write ``model``'s factorised layers (names and constructor arguments) and its state dict to
    ``path``, atomically (a temporary file, then a rename). ``meta``: plain values (str, numbers, lists,
    dicts) kept with them, e.g. the base model's name and the compression report."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict of plain values, got {type(meta).__name__}")
    path = os.fspath(path)
    payload = {"format": FORMAT, "version": VERSION, "layers": _layer_specs(model),
               "state_dict": model.state_dict(), "meta": meta or {}}
    atomic_save(payload, path)


def read(path) -> dict:
    """The checked contents of a file written by :func:`save`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not a torch file; weights_only refuses code
        raise ValueError(f"path {path!r} is not a readable tdconv file: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"path {path!r} is not a file written by tdconv.save (no {FORMAT!r} header)")
    if payload.get("version") != VERSION:
        raise ValueError(f"path {path!r} has format version {payload.get('version')!r}; this tdconv reads "
                         f"version {VERSION}")
    if not isinstance(payload.get("layers"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise ValueError(f"path {path!r} is damaged: its layers or state_dict entry is missing")
    return payload


def load(path, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Rebuild the compressed model saved at ``path`` from its base architecture ``model`` (modified in
    place and returned): the saved factorised layers replace the modules of the same names, then the
    state dict is loaded (``strict`` as in ``load_state_dict``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the base nn.Module to rebuild, got {type(model).__name__}")
    payload = read(path)
    modules = dict(model.named_modules())
    missing = [n for n in payload["layers"] if n not in modules]
    if missing:
        raise ValueError(f"model has no modules named {missing}, which {os.fspath(path)!r} factorised: "
                         "pass the architecture the compressed model was made from")
    p = next(model.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    for name, spec in payload["layers"].items():
        try:
            if not isinstance(spec, dict):
                raise TypeError(f"its specification is a {type(spec).__name__}, not a dict")
            spec = dict(spec)
            kind = spec.pop("kind", "conv")
            if kind not in ("conv", "linear"):
                raise ValueError(f"unknown layer kind {kind!r}")
            layer = (FactorizedLinear if kind == "linear" else FactorizedConv2d)(**spec, **kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"path {os.fspath(path)!r}: layer {name!r} cannot be rebuilt: {exc}") from None
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    model.load_state_dict(payload["state_dict"], strict=strict)
    return model
