"""Loading of the compiled extension ``tdconv._C``.

``import tdconv`` never fails because the extension is missing or broken: the reason is recorded and
reported by :func:`unavailable_reasons` and ``python -m tdconv.info``, and the pure-PyTorch reference
implementations take over.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_C = None
_REASON: str | None = None


def _load() -> None:
    global _C, _REASON
    try:
        mod = importlib.import_module("tdconv._C")
    except Exception as exc:  # ImportError, OSError (undefined symbols), anything a broken build raises
        _REASON = f"tdconv._C could not be loaded: {type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError):
            _REASON += (" (was tdconv imported from a source tree that was never built? Install it with "
                        "`pip install .`, or build in place with `python setup.py build_ext --inplace`)")
        return
    built = getattr(mod, "torch_version", "unknown")
    running = torch.__version__.split("+")[0]
    if built != running:
        _REASON = (f"tdconv._C was built against torch {built} but torch {running} is installed; "
                   "reinstall tdconv (pip install .) to rebuild it")
        return
    if not hasattr(torch.ops.tdconv, "cp_als"):
        _REASON = "tdconv._C loaded but registered no ops"
        return
    _C = mod


_load()


def has_ext() -> bool:
    """True when the compiled extension is loaded and its CPU kernels are usable."""
    return _C is not None


def has_cuda_ext() -> bool:
    """True when the extension was compiled with its CUDA kernels (a GPU need not be present)."""
    return _C is not None and bool(getattr(_C, "cuda_built", 0))


def unavailable_reasons(device: torch.device | str | None = None) -> list[str]:
    """Reasons why the compiled ops cannot run on ``device`` (empty when they can)."""
    if _C is None:
        return [_REASON or "tdconv._C is not loaded"]
    reasons = []
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        if not has_cuda_ext():
            reasons.append("tdconv._C was built without CUDA (no CUDA toolkit or a CPU build of torch at build "
                           "time, or TDCONV_CUDA=0)")
        if not torch.cuda.is_available():
            reasons.append("torch sees no CUDA device")
    elif dev is not None and dev.type not in ("cpu", "cuda"):
        reasons.append(f"device type {dev.type!r} is not supported by tdconv._C")
    return reasons


class FallbackWarning(RuntimeWarning):
    """An op ran on its plain-PyTorch reference because the compiled extension cannot run it (see
    :func:`unavailable_reasons`): the result is the same, the speed is not. The test suite turns it
    into an error, so that a broken build cannot pass on the fallback."""


def use_extension(device: torch.device | str, what: str) -> bool:
    """The one seam between tdconv's Python functions and the compiled ops: True when the extension can
    run ``what`` (an op name, for the message) on ``device``; otherwise a :class:`FallbackWarning`
    saying why, and False (the caller then runs the reference). Every op of the package asks here."""
    reasons = unavailable_reasons(device)
    if reasons:
        warnings.warn(f"tdconv: {what}: the compiled op cannot run on {device} ({'; '.join(reasons)}); using "
                      "the slower pure-PyTorch reference", FallbackWarning, stacklevel=3)
        return False
    return True


def can_run(device: torch.device | str) -> bool:
    """True when the compiled ops can run on tensors of ``device``."""
    return not unavailable_reasons(device)
