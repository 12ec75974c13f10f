"""What the command line and the experiment share: the parsers of their arguments, building a model
by name and loading weights into it.

Light on purpose: it imports neither the training stack nor torchvision until a model is built.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

__all__ = ["parse_rank", "parse_fraction", "parse_input_size", "parse_device", "parse_layers", "is_resnet",
           "build_model", "model_meta", "build_from_meta", "load_weights", "STEMS"]

STEMS = ("imagenet", "cifar")


# ------------------------------------------------------------------------------------------- arguments
def parse_rank(text: str):
    """'0.5' -> 0.5 (fraction), '64' -> 64, '64,32' -> (64, 32); 'evbmf' and 'energy=F' as they are."""
    if text == "evbmf" or text.startswith("energy="):
        return text
    try:
        if "," in text:
            a, b = text.split(",")
            return (int(a), int(b))
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rank must be an int, a pair 'R_out,R_in', a fraction like 0.5, "
                                         f"evbmf or energy=F, got {text!r}") from None


def parse_fraction(text: str) -> float:
    """A budget: a fraction in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"a budget must be a fraction in (0, 1], got {text!r}")
    return v


def parse_input_size(text: str) -> tuple:
    """'3,32,32' -> (3, 32, 32)."""
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"--input-size must be C,H,W (e.g. 3,32,32), got {text!r}")
    return size


def parse_device(text: str) -> str:
    """'cpu', 'cuda' or 'cuda:N', checked against this machine: CUDA must be there to be asked for."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"--device {text!r}: CUDA is not available on this machine "
                                             f"(torch.cuda.is_available() is False; this torch is built for CUDA "
                                             f"{torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"--device {text!r}: this machine has {torch.cuda.device_count()} "
                                             f"GPU(s), numbered from 0")
    return text


def parse_layers(text: str):
    """'all' -> None (every eligible layer), 'seed' as it is, else a list of module names."""
    return None if text == "all" else "seed" if text == "seed" else text.split(",")


# ---------------------------------------------------------------------------------------------- models
def is_resnet(name: str) -> bool:
    """Whether ``name`` is one of torchvision's ResNets (resnet18, resnet50, wide_resnet50_2, ...)."""
    import torchvision.models.resnet as resnet
    return (name.startswith("resnet") or name.startswith("wide_resnet")) and callable(getattr(resnet, name, None))


TIMM_PREFIX = "timm:"


def _build_timm(name: str, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ValueError(f"model {name!r} needs timm: pip install timm (or pip install 'tdconv[timm]')") from exc
    arch = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    if not timm.is_model(arch):  # (tagged names such as convnext_atto.d2_in1k included)
        raise ValueError(f"model {name!r} is not a timm model (e.g. timm:resnet50d, timm:efficientnet_b0, "
                         "timm:convnext_atto)")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def build_model(name: str, num_classes: int, *, stem: str | None = None, in_channels: int = 3) -> nn.Module:
    """A classification model by name, with random weights (nothing is downloaded): a torchvision model
    (``resnet18``, ``mobilenet_v2``, ...) or a timm one (``timm:NAME``, e.g. ``timm:efficientnet_b0``;
    a name torchvision does not have is looked up in timm too, where timm is installed).

    ResNets only: ``stem="imagenet"`` keeps torchvision's 7x7 stride-2 conv and max-pool (the seed's
    model, also on 32x32 inputs), ``"cifar"`` puts a 3x3 stride-1 conv in its place and drops the
    max-pool; ``in_channels`` other than 3 changes the first conv. ``stem=None`` is torchvision's own
    model.
    """
    import torchvision
    if not isinstance(name, str):
        raise ValueError(f"model must be a model name, got {type(name).__name__}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if stem is not None and stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS} or None, got {stem!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
    in_torchvision = name in torchvision.models.list_models(module=torchvision.models)
    if (stem is not None or in_channels != 3) and not is_resnet(name):
        raise ValueError(f"stem and in_channels apply to torchvision ResNets only, not to {name!r}")
    if not in_torchvision:
        if name.startswith(TIMM_PREFIX):
            return _build_timm(name, num_classes)
        try:
            return _build_timm(name, num_classes)
        except ValueError:
            raise ValueError(f"model {name!r} is not a torchvision model (e.g. resnet18, resnet50, vgg11_bn, "
                             "mobilenet_v2) nor, with timm installed, a timm one (timm:NAME)") from None
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def model_meta(name: str, num_classes: int, *, stem: str | None = None, in_channels: int = 3,
               input_size=None) -> dict:
    """What a saved file's metadata holds so that :func:`build_from_meta` can rebuild its base model."""
    meta = {"model": name, "num_classes": int(num_classes), "stem": stem, "in_channels": int(in_channels)}
    if input_size is not None:
        meta["input_size"] = [int(v) for v in input_size]
    return meta


def build_from_meta(meta: dict) -> tuple:
    """``(model, description)``: the base model that :func:`model_meta` describes, with random weights.
    Metadata that lacks an entry, or holds a value of the wrong kind, raises ``ValueError`` saying which."""
    missing = [k for k in ("model", "num_classes") if k not in meta]
    if missing:
        raise ValueError(f"its metadata lacks {', '.join(map(repr, missing))}: the base model cannot be rebuilt "
                         f"(files written by 'tdconv compress' and 'tdconv experiment' carry "
                         f"model, num_classes, stem and in_channels)")
    for key, ok, expected in [("num_classes", lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
                              ("in_channels", lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
                              ("stem", lambda v: v is None or v in STEMS, f"one of {STEMS} or null"),
                              ("model", lambda v: isinstance(v, str), "a torchvision or timm model name")]:
        if key in meta and (isinstance(meta[key], bool) or not ok(meta[key])):
            raise ValueError(f"its metadata has {key}={meta[key]!r}: expected {expected}")
    stem, in_channels = meta.get("stem"), meta.get("in_channels", 3)
    model = build_model(meta["model"], meta["num_classes"], stem=stem, in_channels=in_channels)
    description = f"{meta['model']} with {meta['num_classes']} classes" + \
        (f", {stem} stem" if stem else "") + (f", {in_channels} input channels" if in_channels != 3 else "")
    return model, description


def load_weights(model: nn.Module, path: str, argument: str = "--weights") -> None:
    """Load the state dict in ``path`` (plain, or under a ``state_dict`` / ``model`` key) into
    ``model``; errors are ``SystemExit`` messages naming ``argument``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: {argument} {path!r} does not exist") from None
    except Exception as exc:
        raise SystemExit(f"error: {argument} {path!r} is not a readable state dict: {type(exc).__name__}: {exc}") \
            from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise SystemExit(f"error: {argument} {path!r} does not fit the model: {exc}") from None
