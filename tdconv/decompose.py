"""CP and Tucker decompositions of weight tensors, computed on the tensor's own device.

The algorithms run inside the compiled extension (``torch.ops.tdconv.*``); when it is missing or
cannot run on the tensor's device, the plain-PyTorch reference (:mod:`tdconv.reference`) takes over
with a warning. float32 and float64 tensors are decomposed in their own precision; float16 and
bfloat16 tensors in float32 (the results are float32).
"""
from __future__ import annotations

import concurrent.futures
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import _ext
from . import reference as _ref

__all__ = ["CPTensor", "TuckerTensor", "cp_als", "cp_epc", "tucker_hosvd", "tucker_hooi", "decompose_batch"]


# ---------------------------------------------------------------------------------------------- containers
@dataclass
class CPTensor:
    """A CP (canonical polyadic) decomposition ``sum_r weights[r] * factors[0][:, r] o factors[1][:, r] o ...``.

    Attributes
    ----------
    weights : Tensor [R]
        Component weights; the factors' columns have unit norm.
    factors : list of Tensor [I_n, R]
        One factor per mode.
    errors : list of float
        Relative error ``||X - X^|| / ||X||`` after every sweep (ALS, or EPC after :func:`cp_epc`).
    n_iter : int
        Number of sweeps run.
    rel_error : float
        Final relative error, computed from the rebuilt tensor.
    tensor_norm : float
        ``||X||`` of the decomposed tensor (for the diagnostics below).
    norm_history : list of float
        After :func:`cp_epc`: ``sum(weights^2) / ||X||^2`` after every EPC sweep (else empty).

    Diagnostics (degenerate CP solutions have huge components that cancel each other):
    :attr:`component_norms`, :attr:`norm_ratio`, :attr:`sensitivity`, :meth:`diagnostics`.
    """

    weights: torch.Tensor
    factors: list
    errors: list = field(default_factory=list)
    n_iter: int = 0
    rel_error: float = float("nan")
    tensor_norm: float = float("nan")
    norm_history: list = field(default_factory=list)

    @property
    def component_norms(self) -> torch.Tensor:
        """``[R]``: the Frobenius norm of each rank-1 term (the factors have unit columns)."""
        return self.weights.abs()

    @property
    def norm_ratio(self) -> float:
        """``sum_r weights_r^2 / ||X||^2``: about 1 or below for a healthy decomposition, far above 1
        when components cancel each other. The quantity EPC minimises."""
        return float(self.weights.double().square().sum()) / self.tensor_norm ** 2

    @property
    def sensitivity(self) -> float:
        """Sensitivity of Phan et al. (ECCV 2020): ``E||X^(factors + E) - X^||^2 / sigma^2`` for i.i.d.
        Gaussian perturbations E of variance sigma^2 of the factors, with each component's norm spread
        equally over its N factors (as :class:`~tdconv.FactorizedConv2d` stores them), to first order:
        ``sum_n I_n sum_r |weights_r|^(2(N-1)/N)``; divided by ``||X||^(2(N-1)/N)`` so that it does
        not depend on the tensor's scale."""
        n = len(self.factors)
        p = 2.0 * (n - 1) / n
        total = sum(int(f.shape[0]) for f in self.factors) * float(self.weights.double().abs().pow(p).sum())
        return total / self.tensor_norm ** p

    def diagnostics(self) -> dict:
        """``{"sensitivity", "norm_ratio", "max_component_norm", "min_component_norm"}``, the norms
        relative to ``||X||``."""
        norms = self.component_norms.double() / self.tensor_norm
        return {"sensitivity": self.sensitivity, "norm_ratio": self.norm_ratio,
                "max_component_norm": float(norms.max()), "min_component_norm": float(norms.min())}

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])

    @property
    def shape(self) -> tuple:
        return tuple(int(f.shape[0]) for f in self.factors)

    def to_tensor(self) -> torch.Tensor:
        """The full tensor ``[I_0, ..., I_{N-1}]``."""
        return _ref.cp_to_tensor(self.weights, self.factors)

    def __iter__(self):  # ``weights, factors = cp`` as with tensorly's CPTensor
        return iter((self.weights, self.factors))

    def __repr__(self) -> str:
        return (f"CPTensor(shape={self.shape}, rank={self.rank}, rel_error={self.rel_error:.4g}, "
                f"n_iter={self.n_iter}, dtype={self.weights.dtype}, device={self.weights.device})")


@dataclass
class TuckerTensor:
    """A Tucker decomposition ``core x_{modes[0]} factors[0] x_{modes[1]} factors[1] ...``.

    Attributes
    ----------
    core : Tensor
        The core: the input's shape with every decomposed mode reduced to its rank.
    factors : list of Tensor [I_mode, rank]
        One factor with orthonormal columns per decomposed mode.
    modes : tuple of int
        The decomposed modes (``(0, 1)`` is Tucker-2 on the channel modes of a conv kernel).
    errors : list of float
        Relative error after every HOOI sweep (empty for HOSVD).
    n_iter : int
        Number of HOOI sweeps run (0 for HOSVD).
    rel_error : float
        Final relative error, computed from the rebuilt tensor.
    """

    core: torch.Tensor
    factors: list
    modes: tuple
    errors: list = field(default_factory=list)
    n_iter: int = 0
    rel_error: float = float("nan")

    @property
    def ranks(self) -> tuple:
        return tuple(int(f.shape[1]) for f in self.factors)

    @property
    def shape(self) -> tuple:
        shape = list(self.core.shape)
        for f, m in zip(self.factors, self.modes):
            shape[m] = int(f.shape[0])
        return tuple(shape)

    def to_tensor(self) -> torch.Tensor:
        """The full tensor."""
        return _ref.tucker_to_tensor(self.core, self.factors, list(self.modes))

    def __iter__(self):  # ``core, factors = tucker`` as with tensorly's TuckerTensor
        return iter((self.core, self.factors))

    def __repr__(self) -> str:
        return (f"TuckerTensor(shape={self.shape}, modes={self.modes}, ranks={self.ranks}, "
                f"rel_error={self.rel_error:.4g}, n_iter={self.n_iter}, dtype={self.core.dtype}, "
                f"device={self.core.device})")


# ---------------------------------------------------------------------------------------------- validation
def _check_tensor(tensor, name: str = "tensor") -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_complex() or not tensor.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got dtype {tensor.dtype}")
    if tensor.ndim < 2:
        raise ValueError(f"{name} must have at least 2 modes (order >= 2), got shape {tuple(tensor.shape)}")
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


def _use_ext(device: torch.device) -> bool:
    reasons = _ext.unavailable_reasons(device)
    if reasons:
        warnings.warn("tdconv: compiled ops unavailable on " + str(device) + " (" + "; ".join(reasons)
                      + "); using the slower pure-PyTorch reference", RuntimeWarning, stacklevel=3)
        return False
    return True


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


# ---------------------------------------------------------------------------------------------- CP
def _cp_init(x: torch.Tensor, rank: int, init: str, seed, use_ext: bool) -> list:
    """Initial factors for a batch ``x`` [B, I_0, ...]: ``"svd"`` or ``"random"`` (seeded, generated on
    the CPU in float64 so that every device and dtype starts from the same numbers)."""
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


def _cp_als_group(x: torch.Tensor, rank: int, n_iter_max: int, tol: float, init, l2_reg: float, seed) -> list:
    """CP-ALS of a batch of equally shaped tensors ``x`` [B, I_0, ...]: one extension call."""
    use_ext = _use_ext(x.device)
    if isinstance(init, str):
        factors0 = _cp_init(x, rank, init, seed, use_ext)
    else:  # a CPTensor or a (weights, factors) pair: warm start, identical for every member
        factors0 = [f.to(x).unsqueeze(0).expand(x.shape[0], -1, -1).contiguous() for f in init[1]]
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
    if _use_ext(x.device):
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
    solved by bisection on the device. Each update keeps the error at ``delta`` and cannot increase
    the objective. Where a mode cannot reach ``delta`` (a ``delta`` below the current error) the
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
    try:
        weights, factors = cp
        factors = list(factors)
        rank = int(weights.shape[0])
        ok = isinstance(weights, torch.Tensor) and weights.dim() == 1 and len(factors) == x.dim() and all(
            isinstance(f, torch.Tensor) and tuple(f.shape) == (s, rank) for f, s in zip(factors, x.shape))
    except (TypeError, ValueError, AttributeError, IndexError):
        ok = False
    if not ok:
        raise ValueError(f"cp must be a CPTensor (or (weights, factors)) of a tensor of shape {tuple(x.shape)}: "
                         f"weights [R] and factors [I_n, R]")
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


def _check_cp_args(rank, n_iter_max, tol, init, l2_reg, shape):
    rank = _check_int(rank, "rank")
    n_iter_max = _check_int(n_iter_max, "n_iter_max")
    tol = _check_float(tol, "tol")
    l2_reg = _check_float(l2_reg, "l2_reg")
    if isinstance(init, str):
        if init not in ("svd", "random"):
            raise ValueError(f"init must be 'svd', 'random' or a CPTensor, got {init!r}")
    else:
        try:
            _, factors = init
            ok = len(factors) == len(shape) and all(
                isinstance(f, torch.Tensor) and tuple(f.shape) == (s, rank) for f, s in zip(factors, shape))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"init as a warm start must be a CPTensor (or (weights, factors)) with factors of "
                             f"shapes {[(s, rank) for s in shape]}")
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
    rank, n_iter_max, tol, l2_reg = _check_cp_args(rank, n_iter_max, tol, init, l2_reg, tuple(x.shape))
    if not isinstance(epc, bool):
        raise TypeError(f"epc must be True or False, got {epc!r}")
    cp = _cp_als_group(x.unsqueeze(0), rank, n_iter_max, tol, init, l2_reg, seed)[0]
    return _with_epc(x.unsqueeze(0), [cp], n_iter_max)[0] if epc else cp


def _with_epc(x: torch.Tensor, cps: list, n_iter_max: int) -> list:
    """EPC of a batch at each member's own ALS error."""
    delta = [cp.rel_error * cp.tensor_norm for cp in cps]
    return _cp_epc_group(x, cps, delta, n_iter_max, 1e-6)


# ---------------------------------------------------------------------------------------------- Tucker
def _tucker_group(x: torch.Tensor, ranks: tuple, modes: tuple, hooi: bool, n_iter_max: int, tol: float) -> list:
    use_ext = _use_ext(x.device)
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


# ---------------------------------------------------------------------------------------------- batches
def decompose_batch(tensors: Sequence[torch.Tensor], method: str, rank, *, parallel: bool | None = None,
                    **options) -> list:
    """Decompose many tensors (e.g. every conv kernel of a network) with as few extension calls as possible.

    Tensors of equal shape, dtype, device and rank are stacked and decomposed by one batched call,
    so a GPU runs one sequence of launches per group instead of one per layer. Each result equals
    what the single-tensor function returns for that tensor (up to floating-point rounding).

    Parameters
    ----------
    tensors : sequence of Tensor
    method : {"cp", "hosvd", "hooi"}
        :func:`cp_als`, :func:`tucker_hosvd` or :func:`tucker_hooi`.
    rank : int, pair, or a list with one entry per tensor
        The rank (CP) or ranks (Tucker) of every tensor, or one such value per tensor.
    parallel : bool, optional
        Decompose the shape groups concurrently (one host thread, and on a GPU one CUDA stream, per
        group). Default: on when the tensors are on a GPU and form several groups. Results do not
        depend on it.
    **options
        Keyword arguments of the single-tensor function (``n_iter_max``, ``tol``, ``init``,
        ``l2_reg``, ``seed`` for CP; ``modes``, ``n_iter_max``, ``tol`` for Tucker).

    Returns
    -------
    list of CPTensor or TuckerTensor, in the order of ``tensors``.

    Examples
    --------
    >>> import torch, tdconv
    >>> ws = [torch.randn(64, 64, 9), torch.randn(64, 64, 9), torch.randn(128, 64, 9)]
    >>> [cp.rank for cp in tdconv.decompose_batch(ws, "cp", [32, 32, 64], n_iter_max=10, seed=0)]
    [32, 32, 64]
    """
    if method not in ("cp", "hosvd", "hooi"):
        raise ValueError(f"method must be 'cp', 'hosvd' or 'hooi', got {method!r}")
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError("tensors must be a list or tuple of tensors")
    n = len(tensors)
    per_tensor = isinstance(rank, list)
    if per_tensor and len(rank) != n:
        raise ValueError(f"rank is a list of {len(rank)} entries for {n} tensors")
    allowed = {"cp": {"n_iter_max", "tol", "init", "l2_reg", "seed", "epc"}, "hosvd": {"modes"},
               "hooi": {"modes", "n_iter_max", "tol"}}[method]
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unexpected options for method {method!r}: {sorted(unknown)} (allowed: {sorted(allowed)})")
    n_iter_max = _check_int(options.get("n_iter_max", 100), "n_iter_max")
    tol = _check_float(options.get("tol", 1e-7), "tol")
    l2_reg = _check_float(options.get("l2_reg", 0.0), "l2_reg")
    init = options.get("init", "svd")
    xs, keys = [], []
    for i, t in enumerate(tensors):
        x = _check_tensor(t, f"tensors[{i}]")
        r = rank[i] if per_tensor else rank
        if method == "cp":
            r = _check_cp_args(r, n_iter_max, tol, init, l2_reg, tuple(x.shape))[0]
        else:
            modes = _check_modes(options.get("modes"), x.ndim)
            r = (_check_tucker_ranks(r, tuple(x.shape), modes), modes)
        xs.append(x)
        keys.append((tuple(x.shape), x.dtype, x.device, r))
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)

    def job(key, x):
        if method == "cp":
            if options.get("epc", False) not in (True, False):
                raise TypeError(f"epc must be True or False, got {options['epc']!r}")
            if options.get("epc"):
                return lambda: _with_epc(x, _cp_als_group(x, key[3], n_iter_max, tol, init, l2_reg,
                                                          options.get("seed")), n_iter_max)
            return lambda: _cp_als_group(x, key[3], n_iter_max, tol, init, l2_reg, options.get("seed"))
        ranks, modes = key[3]
        return lambda: _tucker_group(x, ranks, modes, method == "hooi", n_iter_max, tol)

    jobs = [(key[2], job(key, torch.stack([xs[i] for i in idx]))) for key, idx in groups.items()]
    if parallel is None:
        parallel = len(jobs) > 1 and all(dev.type == "cuda" for dev, _ in jobs)
    results: list = [None] * n
    for idx, out in zip(groups.values(), _run_jobs(jobs, parallel)):
        for i, res in zip(idx, out):
            results[i] = res
    return results


def _run_jobs(jobs: list, parallel: bool) -> list:
    """Run the per-group decompositions, one after the other or concurrently.

    Concurrently, every group gets a host thread (the ops release the GIL) and, on a GPU, its own
    CUDA stream: a sweep on a small layer is a sequence of small launches whose host-side cost
    dominates, so issuing the groups' launches from several threads keeps the GPU busy.
    """
    if not parallel or len(jobs) < 2:
        return [j() for _, j in jobs]

    def run(dev: torch.device, j):
        if dev.type != "cuda":
            return j()
        with torch.cuda.device(dev):
            main = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(main)  # the stacked inputs were written on the caller's stream
            with torch.cuda.stream(side):
                out = j()
            side.synchronize()
        return out

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda dj: run(*dj), jobs))
