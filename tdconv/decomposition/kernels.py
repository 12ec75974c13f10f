"""Decompositions of conv kernels ``[C_out, C_in, kh, kw]`` in the forms the factorised layers use."""
from __future__ import annotations

import torch

from ._common import _check_seed, _check_tensor
from .cp import cp_als
from .tucker import tucker_hooi

__all__ = ["KERNEL_METHODS", "decompose_kernel"]

KERNEL_METHODS = ("cp", "cp4", "tucker")
_OPTIONS = {"cp": {"n_iter_max", "tol", "init", "l2_reg", "epc"}, "tucker": {"n_iter_max", "tol"}}


def decompose_kernel(weight: torch.Tensor, method: str, rank, *, seed: int | None = None, **options):
    """The decomposition of a conv kernel that a :class:`~tdconv.FactorizedConv2d` of ``method`` is made of.

    Parameters
    ----------
    weight : Tensor [C_out, C_in, kh, kw]
    method : {"cp", "cp4", "tucker"}
        ``"cp"``: :func:`cp_als` of the order-3 kernel ``[C_out, C_in, kh*kw]``; ``"cp4"``: of the order-4
        kernel; ``"tucker"``: :func:`tucker_hooi` on the channel modes ``(0, 1)`` (Tucker-2).
    rank : int or (int, int)
        The CP rank R, or the Tucker ranks ``(R_out, R_in)``.
    seed : int, optional
        Seed of the CP initialisation. Accepted for every method, so that one set of options serves all;
        Tucker (HOOI from the HOSVD) is deterministic and does not use it.
    **options
        Of :func:`cp_als` (``n_iter_max``, ``tol``, ``init``, ``l2_reg``, ``epc``) or :func:`tucker_hooi`
        (``n_iter_max``, ``tol``).

    Returns
    -------
    CPTensor or TuckerTensor
    """
    if method not in KERNEL_METHODS:
        raise ValueError(f"method must be one of {KERNEL_METHODS}, got {method!r}")
    w = _check_tensor(weight, "weight")
    if w.dim() != 4:
        raise ValueError(f"weight must be a conv kernel [C_out, C_in, kh, kw], got shape {tuple(w.shape)}")
    seed = _check_seed(seed)
    family = "tucker" if method == "tucker" else "cp"
    unknown = sorted(set(options) - _OPTIONS[family])
    if unknown:
        raise TypeError(f"unexpected decomposition options for method {method!r}: {unknown} "
                        f"(allowed: {sorted(_OPTIONS[family] | {'seed'})})")
    if method == "tucker":
        return tucker_hooi(w, rank, modes=(0, 1), **options)
    c_out, c_in, kh, kw = w.shape
    x = w.reshape(c_out, c_in, kh * kw) if method == "cp" else w
    return cp_als(x, rank, seed=seed, **options)
