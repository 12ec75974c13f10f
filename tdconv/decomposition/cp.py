"""CP decomposition: initialisation, alternating least squares and the error preserving correction."""
from __future__ import annotations

import math

import torch

from .. import reference as _ref
from .._ext import use_extension
from ._common import (_check_every, _check_float, _check_int, _check_seed, _check_tensor, _rel_error,
                      _trim_errors)
from ._containers import CPTensor

__all__ = ["initialize_cp", "cp_als", "cp_epc"]


def _init_factors(x: torch.Tensor, rank: int, init: str, seed, use_ext: bool) -> list:
    """Initial factors ``[B, I_n, R]`` for a batch ``x`` [B, I_0, ...]: ``"svd"`` or ``"random"`` (seeded,
    generated on the CPU in float64 so that every device and dtype starts from the same numbers)."""
    gen = torch.Generator()
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    B, shape = x.shape[0], x.shape[1:]

    def draw(rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
        # The same numbers for every batch member: a batched call starts each member exactly where
        # a single call with that seed would.
        r = torch.randn(1, rows, cols, generator=gen, dtype=torch.float64) * scale
        return r.to(x).expand(B, rows, cols).contiguous()

    if init == "random":
        return [draw(s, rank) for s in shape]
    fill = [draw(s, max(rank - s, 0), 1.0 / math.sqrt(s)) for s in shape]
    if use_ext:
        return list(torch.ops.tdconv.cp_init_svd(x, rank, fill))
    per = [_ref.cp_init_svd(x[b], rank, [f[b] for f in fill]) for b in range(B)]
    return [torch.stack([p[n] for p in per]) for n in range(len(shape))]


def initialize_cp(tensor: torch.Tensor, rank: int, *, init: str = "svd", seed: int | None = None) -> CPTensor:
    """The starting point :func:`cp_als` uses: unit weights and initial factors of ``tensor``.

    Parameters
    ----------
    tensor : Tensor [I_0, ..., I_{N-1}], N >= 2
    rank : int
    init : {"svd", "random"}
        ``"svd"``: the leading left singular vectors of each unfolding (columns beyond a mode's size are
        seeded Gaussian, scaled by ``1 / sqrt(I_n)``); ``"random"``: seeded Gaussian factors.
    seed : int, optional
        Seed of the random numbers (drawn on the CPU in float64, so every device and dtype starts from the
        same numbers); ``None`` draws one from torch's global generator.

    Returns
    -------
    CPTensor
        ``weights`` all ones [R], ``factors`` [I_n, R] (not normalised), ``n_iter`` 0.

    Examples
    --------
    >>> import torch, tdconv
    >>> x = torch.randn(8, 6, 5)
    >>> start = tdconv.initialize_cp(x, 3, init="random", seed=0)
    >>> tdconv.cp_als(x, 3, init=start, n_iter_max=5).rank
    3
    """
    x = _check_tensor(tensor)
    rank = _check_int(rank, "rank")
    seed = _check_seed(seed)
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    factors = _init_factors(x.unsqueeze(0), rank, init, seed, use_extension(x.device, "cp_init_svd"))
    return CPTensor(torch.ones(rank, dtype=x.dtype, device=x.device), [f[0] for f in factors])


def _cp_als_group(x: torch.Tensor, rank: int, n_iter_max: int, tol: float, init, l2_reg: float, seed) -> list:
    """CP-ALS of a batch of equally shaped tensors ``x`` [B, I_0, ...]: one extension call."""
    use_ext = use_extension(x.device, "cp_als")
    if isinstance(init, str):
        factors0 = _init_factors(x, rank, init, seed, use_ext)
    else:  # a CPTensor or a (weights, factors) pair: warm start, identical for every member
        weights, factors = init
        factors = [f.to(x) for f in factors]
        if weights is not None:
            factors[0] = factors[0] * weights.to(x)  # the weights go into the first factor: the same tensor
        factors0 = [f.unsqueeze(0).expand(x.shape[0], -1, -1).contiguous() for f in factors]
    if use_ext:
        w, fs, errs, n_iter = torch.ops.tdconv.cp_als(x, factors0, n_iter_max, tol, l2_reg, _check_every(x.device))
        n_iter = n_iter.tolist()
        errs = errs.cpu()
        out = []
        for b in range(x.shape[0]):
            cp = CPTensor(w[b], [f[b] for f in fs], _trim_errors(errs[b], n_iter[b], "cp_als"), n_iter[b])
            out.append(cp)
    else:
        out = []
        for b in range(x.shape[0]):
            w, fs, errs, n = _ref.cp_als(x[b], [f[b] for f in factors0], n_iter_max, tol, l2_reg)
            out.append(CPTensor(w, fs, errs, n))
    for b, cp in enumerate(out):
        cp.rel_error = _rel_error(x[b], cp.to_tensor())
        cp.tensor_norm = float(torch.linalg.vector_norm(x[b].double()))
    return out


def _cp_epc_group(x: torch.Tensor, cps: list, delta: list, n_iter_max: int, tol: float) -> list:
    """EPC of a batch ``x`` [B, I_0, ...] from the CP results ``cps`` (one per member): one extension call."""
    weights = torch.stack([cp.weights.to(x) for cp in cps])
    factors = [torch.stack([cp.factors[n].to(x) for cp in cps]) for n in range(x.dim() - 1)]
    d = torch.tensor(delta, dtype=torch.float64, device=x.device)
    if use_extension(x.device, "cp_epc"):
        w, fs, norms, n_iter, errs = torch.ops.tdconv.cp_epc(x, weights, factors, d, n_iter_max, tol,
                                                               _check_every(x.device))
        n_iter, errs, norms = n_iter.tolist(), errs.cpu(), norms.cpu()
        out = [CPTensor(w[b], [f[b] for f in fs], errs[b, :n_iter[b]].tolist(), n_iter[b],
                        norm_history=norms[b, :n_iter[b]].tolist()) for b in range(x.shape[0])]
    else:
        out = []
        for b in range(x.shape[0]):
            w, fs, norms, n, errs = _ref.cp_epc(x[b], weights[b], [f[b] for f in factors], delta[b], n_iter_max, tol)
            out.append(CPTensor(w, fs, errs, n, norm_history=norms))
    for b, cp in enumerate(out):
        cp.rel_error = _rel_error(x[b], cp.to_tensor())
        cp.tensor_norm = float(torch.linalg.vector_norm(x[b].double()))
    return out


def cp_epc(cp, tensor: torch.Tensor, *, delta: float | None = None, n_iter_max: int = 100,
           tol: float = 1e-6) -> CPTensor:
    """Error preserving correction of a CP decomposition: the same error, the smallest components.

    Finds factors with unit-norm columns and weights that minimise ``sum_r weights_r^2`` subject to
    ``||tensor - CP|| <= delta``, starting from ``cp``. CP-ALS often lands on degenerate solutions,
    a few huge rank-1 terms that cancel each other: the fit looks fine, but the factorised layer is
    ill-conditioned and fine-tuning it is unstable. EPC keeps the fit and removes the cancellation.

    Parameters
    ----------
    cp : CPTensor or (weights, factors)
        The starting point, usually the result of :func:`cp_als` on ``tensor``.
    tensor : Tensor [I_0, ..., I_{N-1}]
        The decomposed tensor.
    delta : float, optional
        The error bound ``||tensor - CP||_F`` (absolute). Default: the error of ``cp``.
    n_iter_max : int
        Maximum number of EPC sweeps.
    tol : float
        Stop when ``sum(weights^2) / ||tensor||^2`` changes by less than ``tol`` between two sweeps.

    Returns
    -------
    CPTensor
        ``errors`` holds the relative error after every EPC sweep, ``norm_history`` the normalised
        sum of squared weights.

    Notes
    -----
    A.-H. Phan, P. Tichavsky, A. Cichocki, "Error preserving correction: a method for CP decomposition
    at a target error bound", IEEE Trans. Signal Processing 67(5), 2019; A.-H. Phan et al., "Stable
    low-rank tensor decomposition for compression of convolutional neural network", ECCV 2020. Mode by
    mode, the update is a least-norm problem under a sphere constraint; in the eigenbasis of the
    Hadamard product of the other factors' Gram matrices it reduces to a scalar secular equation,
    solved by a few Newton steps on the device. Each update keeps the error at ``delta`` and cannot
    increase the objective. Each sweep starts from an extrapolation of the last two accepted iterates
    and is kept only if it ends within ``delta`` with smaller norms (A. Ang, N. Gillis, "Accelerating
    nonnegative matrix factorization algorithms using extrapolation", Neural Computation 31(2), 2019);
    ``n_iter`` counts dropped sweeps too, which repeat the last values in ``errors`` and
    ``norm_history``. The iterate is float64 whatever the tensor's dtype. Where a mode cannot reach ``delta`` (a ``delta`` below the current error) the
    update is the least-squares one, as in ALS.

    Examples
    --------
    >>> import torch, tdconv
    >>> w = torch.randn(64, 64, 9)
    >>> cp = tdconv.cp_als(w, rank=32, n_iter_max=300, seed=0)
    >>> stable = tdconv.cp_epc(cp, w)
    >>> stable.norm_ratio < cp.norm_ratio and abs(stable.rel_error - cp.rel_error) < 1e-4
    True
    """
    x = _check_tensor(tensor)
    weights, factors = _check_cp(cp, tuple(x.shape), None, "cp")
    if any(f.device != x.device for f in factors) or weights.device != x.device:
        raise ValueError(f"cp lives on {weights.device} but tensor on {x.device}")
    n_iter_max = _check_int(n_iter_max, "n_iter_max")
    tol = _check_float(tol, "tol")
    start = CPTensor(weights.to(x), [f.to(x) for f in factors])
    if delta is None:
        delta = float(torch.linalg.vector_norm((x - start.to_tensor()).double()))
    else:
        delta = _check_float(delta, "delta")
    return _cp_epc_group(x.unsqueeze(0), [start], [delta], n_iter_max, tol)[0]


def _check_cp(cp, shape: tuple, rank, name: str, weights_optional: bool = False) -> tuple:
    """``(weights, factors)`` of a CPTensor or a ``(weights, factors)`` pair of a tensor of ``shape`` (and of
    ``rank`` when given): weights [R] (or None where optional), factors [I_n, R]; else ``ValueError``."""
    try:
        weights, factors = cp
        factors = list(factors)
        r = rank if rank is not None else int(factors[0].shape[1] if weights is None else weights.shape[0])
        ok = (weights is None and weights_optional or isinstance(weights, torch.Tensor)
              and tuple(weights.shape) == (r,)) and len(factors) == len(shape) and all(
            isinstance(f, torch.Tensor) and tuple(f.shape) == (s, r) for f, s in zip(factors, shape))
    except (TypeError, ValueError, AttributeError, IndexError):
        ok, r = False, rank if rank is not None else "R"
    if not ok:
        raise ValueError(f"{name} must be a CPTensor (or (weights, factors)) of a tensor of shape {shape}: weights "
                         f"[{r}]{' (or None)' if weights_optional else ''} and factors of shapes "
                         f"{[(s, r) for s in shape]}")
    return weights, factors


def _check_cp_args(rank, n_iter_max, tol, init, l2_reg, shape, seed=None):
    rank = _check_int(rank, "rank")
    _check_seed(seed)
    n_iter_max = _check_int(n_iter_max, "n_iter_max")
    tol = _check_float(tol, "tol")
    l2_reg = _check_float(l2_reg, "l2_reg")
    if isinstance(init, str):
        if init not in ("svd", "random"):
            raise ValueError(f"init must be 'svd', 'random' or a CPTensor, got {init!r}")
    else:
        _check_cp(init, shape, rank, "init as a warm start", weights_optional=True)
    return rank, n_iter_max, tol, l2_reg


def cp_als(tensor: torch.Tensor, rank: int, *, n_iter_max: int = 100, tol: float = 1e-7, init="svd",
           l2_reg: float = 0.0, seed: int | None = None, epc: bool = False) -> CPTensor:
    """CP decomposition by alternating least squares, on the tensor's device.

    Parameters
    ----------
    tensor : Tensor [I_0, ..., I_{N-1}], N >= 2
        For a conv kernel ``[C_out, C_in, kh*kw]`` (order 3) or ``[C_out, C_in, kh, kw]`` (order 4).
    rank : int
        Number of rank-1 components R; it may exceed the size of a mode.
    n_iter_max : int
        Maximum number of ALS sweeps.
    tol : float
        Stop when the relative error changes by less than ``tol`` between two sweeps (0: run all sweeps).
    init : {"svd", "random"} or CPTensor
        ``"svd"``: leading left singular vectors of each unfolding (columns beyond a mode's size are
        seeded random); ``"random"``: seeded Gaussian factors; a ``CPTensor``: warm start.
    l2_reg : float
        Ridge added to the normal equations (``V + l2_reg * I``; the other factors have unit columns).
    seed : int, optional
        Seed of the random numbers the initialisation uses (``None``: drawn from torch's global RNG).
    epc : bool
        Follow ALS by :func:`cp_epc` at ALS's error (up to ``n_iter_max`` EPC sweeps): the same fit
        with the smallest components, for layers that fine-tune stably.

    Returns
    -------
    CPTensor
        ``weights`` [R], ``factors`` [I_n, R] with unit-norm columns, ``errors`` (history), ``n_iter``,
        ``rel_error``, and the diagnostics (``sensitivity``, ``norm_ratio``, ``component_norms``).

    Notes
    -----
    Kolda & Bader, "Tensor Decompositions and Applications", SIAM Review 51(3), 2009, sec. 3.4. The
    normal equations are formed from the Hadamard product of the factor Gram matrices and solved by
    Cholesky; the MTTKRPs use a dimension tree rooted at the largest mode; the error comes from norms
    and inner products, without rebuilding the tensor.

    Examples
    --------
    >>> import torch, tdconv
    >>> w = torch.randn(64, 64, 3, 3)
    >>> cp = tdconv.cp_als(w.reshape(64, 64, 9), rank=32, seed=0)
    >>> cp.factors[0].shape, cp.weights.shape
    (torch.Size([64, 32]), torch.Size([32]))
    """
    x = _check_tensor(tensor)
    rank, n_iter_max, tol, l2_reg = _check_cp_args(rank, n_iter_max, tol, init, l2_reg, tuple(x.shape), seed)
    if not isinstance(epc, bool):
        raise TypeError(f"epc must be True or False, got {epc!r}")
    cp = _cp_als_group(x.unsqueeze(0), rank, n_iter_max, tol, init, l2_reg, seed)[0]
    return _with_epc(x.unsqueeze(0), [cp], n_iter_max)[0] if epc else cp


def _with_epc(x: torch.Tensor, cps: list, n_iter_max: int) -> list:
    """EPC of a batch at each member's own ALS error."""
    delta = [cp.rel_error * cp.tensor_norm for cp in cps]
    return _cp_epc_group(x, cps, delta, n_iter_max, 1e-6)
