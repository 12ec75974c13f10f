"""Tucker decomposition: truncated HOSVD and HOOI."""
from __future__ import annotations

import torch

from .. import reference as _ref
from .._ext import use_extension
from ._common import (_check_every, _check_float, _check_int, _check_modes, _check_tensor, _check_tucker_ranks,
                      _rel_error, _trim_errors)
from ._containers import TuckerTensor

__all__ = ["tucker_hosvd", "tucker_hooi"]


def _tucker_group(x: torch.Tensor, ranks: tuple, modes: tuple, hooi: bool, n_iter_max: int, tol: float) -> list:
    use_ext = use_extension(x.device, "tucker_hooi" if hooi else "tucker_hosvd")
    B = x.shape[0]
    if use_ext:
        core, factors = torch.ops.tdconv.tucker_hosvd(x, list(ranks), list(modes))
        errs, n_iter = None, [0] * B
        if hooi:
            core, factors, errs, n_iter = torch.ops.tdconv.tucker_hooi(
                x, factors, list(modes), n_iter_max, tol, _check_every(x.device))
            n_iter, errs = n_iter.tolist(), errs.cpu()
        out = [TuckerTensor(core[b], [f[b] for f in factors], modes,
                            _trim_errors(errs[b], n_iter[b], "tucker_hooi") if hooi else [], n_iter[b])
               for b in range(B)]
    else:
        out = []
        for b in range(B):
            core, factors = _ref.tucker_hosvd(x[b], list(ranks), list(modes))
            errs, n = [], 0
            if hooi:
                core, factors, errs, n = _ref.tucker_hooi(x[b], factors, list(modes), n_iter_max, tol)
            out.append(TuckerTensor(core, factors, modes, errs, n))
    for b, t in enumerate(out):
        t.rel_error = _rel_error(x[b], t.to_tensor())
    return out


def tucker_hosvd(tensor: torch.Tensor, ranks, *, modes=None) -> TuckerTensor:
    """Truncated higher-order SVD, on the tensor's device.

    Parameters
    ----------
    tensor : Tensor [I_0, ..., I_{N-1}], N >= 2
    ranks : int or sequence of int
        One rank per decomposed mode (an int applies to all of them); ``1 <= ranks[i] <= I_modes[i]``.
    modes : sequence of int, optional
        Modes to decompose (default: all). ``modes=(0, 1)`` is Tucker-2 on a conv kernel's channels.

    Returns
    -------
    TuckerTensor
        ``core``, ``factors`` (orthonormal columns: the leading left singular vectors of each
        unfolding, with deterministic signs), ``modes``, ``rel_error``.

    Notes
    -----
    De Lathauwer, De Moor, Vandewalle, "A multilinear singular value decomposition", SIAM J. Matrix
    Anal. Appl. 21(4), 2000. The singular vectors come from the eigendecomposition of each unfolding's
    Gram matrix (``I_n x I_n``), far cheaper than an SVD of the ``I_n x prod(others)`` unfolding.

    Examples
    --------
    >>> import torch, tdconv
    >>> w = torch.randn(64, 32, 3, 3)
    >>> t = tdconv.tucker_hosvd(w, (16, 8), modes=(0, 1))
    >>> t.core.shape
    torch.Size([16, 8, 3, 3])
    """
    x = _check_tensor(tensor)
    modes = _check_modes(modes, x.ndim)
    ranks = _check_tucker_ranks(ranks, tuple(x.shape), modes)
    return _tucker_group(x.unsqueeze(0), ranks, modes, False, 1, 0.0)[0]


def tucker_hooi(tensor: torch.Tensor, ranks, *, modes=None, n_iter_max: int = 100, tol: float = 1e-7) -> TuckerTensor:
    """Tucker decomposition by higher-order orthogonal iteration (HOOI), from the HOSVD, on the tensor's device.

    Parameters
    ----------
    tensor : Tensor [I_0, ..., I_{N-1}], N >= 2
    ranks : int or sequence of int
        One rank per decomposed mode, as in :func:`tucker_hosvd`.
    modes : sequence of int, optional
        Modes to decompose (default: all).
    n_iter_max : int
        Maximum number of sweeps.
    tol : float
        Stop when the relative error changes by less than ``tol`` between two sweeps (0: run all sweeps).

    Returns
    -------
    TuckerTensor
        As :func:`tucker_hosvd`, with the error history in ``errors`` and the sweep count in ``n_iter``.

    Notes
    -----
    De Lathauwer, De Moor, Vandewalle, "On the best rank-1 and rank-(R1,...,RN) approximation of
    higher-order tensors", SIAM J. Matrix Anal. Appl. 21(4), 2000. Each sweep never increases the error.

    Examples
    --------
    >>> import torch, tdconv
    >>> w = torch.randn(64, 32, 3, 3)
    >>> t = tdconv.tucker_hooi(w, (16, 8), modes=(0, 1))
    >>> t.rel_error <= tdconv.tucker_hosvd(w, (16, 8), modes=(0, 1)).rel_error + 1e-6
    True
    """
    x = _check_tensor(tensor)
    modes = _check_modes(modes, x.ndim)
    ranks = _check_tucker_ranks(ranks, tuple(x.shape), modes)
    n_iter_max = _check_int(n_iter_max, "n_iter_max")
    tol = _check_float(tol, "tol")
    return _tucker_group(x.unsqueeze(0), ranks, modes, True, n_iter_max, tol)[0]
