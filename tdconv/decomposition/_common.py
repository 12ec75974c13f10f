"""Argument checks shared by every decomposition."""
from __future__ import annotations

import math
import numbers
import warnings

import torch



def _check_tensor(tensor, name: str = "tensor") -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_complex() or not tensor.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got dtype {tensor.dtype}")
    if tensor.ndim < 2:
        raise ValueError(f"{name} must have at least 2 modes (order >= 2), got shape {tuple(tensor.shape)}")
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it has shapes but no values to decompose")
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    if float(torch.linalg.vector_norm(tensor.float())) == 0.0:
        raise ValueError(f"{name} is all zeros: it has no decomposition of positive rank to fit")
    t = tensor.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if float(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def _check_modes(modes, ndim: int) -> tuple:
    if modes is None:
        return tuple(range(ndim))
    if isinstance(modes, numbers.Integral) and not isinstance(modes, bool):
        modes = (modes,)
    try:
        modes = tuple(modes)
    except TypeError:
        raise TypeError(f"modes must be a sequence of integers, got {modes!r}") from None
    if not modes:
        raise ValueError("modes must name at least one mode")
    out = []
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral):
            raise TypeError(f"modes must be integers, got {m!r}")
        if not -ndim <= m < ndim:
            raise ValueError(f"mode {m} is out of range for a tensor of order {ndim} (expected -{ndim}..{ndim - 1})")
        m = int(m) % ndim
        if m in out:
            raise ValueError(f"modes must be distinct, mode {m} is repeated in {modes}")
        out.append(m)
    return tuple(out)


def _check_tucker_ranks(ranks, shape: tuple, modes: tuple) -> tuple:
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        ranks = (ranks,) * len(modes)
    try:
        ranks = tuple(ranks)
    except TypeError:
        raise TypeError(f"ranks must be an integer or a sequence of integers, got {ranks!r}") from None
    if len(ranks) != len(modes):
        raise ValueError(f"ranks has {len(ranks)} entries but {len(modes)} modes {modes} are decomposed")
    out = []
    for r, m in zip(ranks, modes):
        r = _check_int(r, f"ranks (mode {m})")
        if r > shape[m]:
            raise ValueError(f"ranks: rank {r} of mode {m} exceeds that mode's size {shape[m]}")
        out.append(r)
    return tuple(out)


def _check_seed(seed, name: str = "seed"):
    """``None`` or an integer (a float such as 1.7 would be truncated silently, so it is refused)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an integer or None, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return int(seed)


def _check_every(device: torch.device) -> int:
    # Host synchronisation is free on the CPU; on a GPU the convergence flag is read every 8 sweeps
    # (converged problems are frozen on the device in between, so results do not depend on it).
    return 1 if device.type == "cpu" else 8


def _rel_error(x: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - approx) / torch.linalg.vector_norm(x))


def _trim_errors(row: torch.Tensor, n: int, what: str) -> list:
    errs = row[:n].tolist()
    if n < row.numel() and row[n].item() == math.inf:
        hint = " (a small l2_reg helps)" if what == "cp_als" else ""
        warnings.warn(f"tdconv: {what} stopped after {n} sweeps: a sweep produced a non-finite error (a singular "
                      f"system); the last good iterate is returned{hint}", RuntimeWarning, stacklevel=4)
    return errs
