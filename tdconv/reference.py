"""Plain-PyTorch reference implementations of every tdconv op.

These are the test oracle for the compiled extension, the fallback when the extension is missing, and
the ``reference`` baseline of the benchmarks. They favour obviousness over speed: the full Khatri-Rao
product is materialised, systems are solved with LU (``torch.linalg.solve``), leading singular
vectors come from ``torch.linalg.svd``, and errors are computed by rebuilding the tensor.
All functions take a single (unbatched) tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "unfold", "khatri_rao", "cp_to_tensor", "tucker_to_tensor", "mode_dot", "fix_signs",
    "cp_init_svd", "cp_als", "tucker_hosvd", "tucker_hooi", "mode_contract", "cp_conv2d",
    "tucker_conv2d",
]


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding ``[I_mode, prod(other sizes)]`` (other modes in C order)."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def khatri_rao(factors: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product; row index in C order of the factors' row indices."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, out.shape[1])
    return out


def cp_to_tensor(weights: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Full tensor of ``sum_r weights[r] * factors[0][:, r] o factors[1][:, r] o ...``."""
    shape = [f.shape[0] for f in factors]
    full = (factors[0] * weights) @ khatri_rao(factors[1:]).T
    return full.reshape(shape)


def mode_dot(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``x`` times ``matrix`` ([J, I_mode]) along ``mode``: that mode's size becomes J."""
    return torch.tensordot(matrix, x.movedim(mode, 0), dims=1).movedim(0, mode)


def tucker_to_tensor(core: torch.Tensor, factors: list[torch.Tensor], modes: list[int]) -> torch.Tensor:
    """Full tensor of ``core x_{modes[0]} factors[0] x_{modes[1]} factors[1] ...``."""
    out = core
    for f, m in zip(factors, modes):
        out = mode_dot(out, f, m)
    return out


def fix_signs(u: torch.Tensor) -> torch.Tensor:
    """Make the largest-magnitude entry of every column positive (deterministic singular vectors)."""
    idx = u.abs().argmax(0, keepdim=True)
    s = u.gather(0, idx).sign()
    s = torch.where(s == 0, torch.ones_like(s), s)
    return u * s


def _leading_left_singular_vectors(m: torch.Tensor, r: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return fix_signs(u[:, :r])


def cp_init_svd(x: torch.Tensor, rank: int, random_fill: list[torch.Tensor]) -> list[torch.Tensor]:
    """Leading left singular vectors of each unfolding; columns past a mode's size from ``random_fill``."""
    out = []
    for n in range(x.ndim):
        u = _leading_left_singular_vectors(unfold(x, n), min(rank, x.shape[n]))
        if rank > x.shape[n]:
            u = torch.cat([u, random_fill[n].to(u)], dim=1)
        out.append(u)
    return out


def _normalise_columns(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam = torch.linalg.vector_norm(u, dim=0)
    return u / torch.where(lam > 0, lam, torch.ones_like(lam)), lam


def cp_als(x: torch.Tensor, init: list[torch.Tensor], n_iter_max: int = 100, tol: float = 1e-7,
           l2_reg: float = 0.0):
    """CP-ALS (Kolda & Bader 2009) from the factors ``init``.

    Returns ``(weights [R], factors, errors, n_iter)`` with the relative error after every sweep.
    """
    n_modes = x.ndim
    factors = [_normalise_columns(f)[0] for f in init]
    rank = factors[0].shape[1]
    weights = torch.ones(rank, dtype=x.dtype, device=x.device)
    norm_x = torch.linalg.vector_norm(x)
    errors: list[float] = []
    for _ in range(n_iter_max):
        for n in range(n_modes):
            others = [factors[m] for m in range(n_modes) if m != n]
            v = torch.ones(rank, rank, dtype=x.dtype, device=x.device)
            for f in others:
                v = v * (f.T @ f)
            v = v + l2_reg * torch.eye(rank, dtype=x.dtype, device=x.device)
            mttkrp = unfold(x, n) @ khatri_rao(others)
            factors[n], weights = _normalise_columns(torch.linalg.solve(v, mttkrp.T).T)
        err = torch.linalg.vector_norm(x - cp_to_tensor(weights, factors)) / norm_x
        errors.append(float(err))
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    return weights, factors, errors, len(errors)


# Extrapolation of EPC's sweeps (Ang & Gillis, Neural Computation 31(2), 2019), as in the engine: the
# initial beta and its cap, the factor beta shrinks by when an extrapolated sweep is rejected, and the
# factors beta and its cap grow by when one is accepted.
_EPC_BETA0, _EPC_BETA_MAX0, _EPC_SHRINK, _EPC_GROW, _EPC_GROW_MAX = 0.5, 1.0, 1.5, 1.05, 1.01


def _epc_secular_kappa(s: torch.Tensor, z: torch.Tensor, d: float) -> float:
    """The ``kappa = 1 / mu`` where ``P(kappa) = sum (z / s) / (1 + s kappa)^2`` (decreasing from
    ``sum z / s`` at 0 to 0) equals ``d``, by bisection to adjacent doubles; the side with
    ``P > d`` (the bound just missed) is returned."""
    def excess(k):
        return float(((z / s) / (1 + s * k) ** 2).sum())

    lo, hi = 0.0, 1.0
    while excess(hi) > d:
        lo, hi = hi, 2 * hi
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        lo, hi = (mid, hi) if excess(mid) > d else (lo, mid)
    return lo


def cp_epc(x: torch.Tensor, weights: torch.Tensor, factors: list[torch.Tensor], delta: float,
           n_iter_max: int = 100, tol: float = 1e-6):
    """Error preserving correction (Phan, Tichavsky, Cichocki, IEEE TSP 2019): mode by mode, the
    least-norm factor ``A = U_n diag(weights)`` with ``||X_(n) - A K^T|| <= delta``. In the eigenbasis
    ``W = K^T K = V diag(s) V^T`` the least-squares update ``Z diag(1/s) V^T`` (``Z = X_(n) K V``) is
    shrunk to ``Z diag(1/(s + mu)) V^T``, which raises the residual by ``sum (z/s) (mu/(s + mu))^2``
    (``z`` the squared column norms of ``Z``); ``mu`` makes that rise the slack ``d`` of the
    least-squares update (none where ``d <= 0``: the least-squares update). Each sweep starts from the
    extrapolation ``U + beta (U - U_prev)`` of the last two accepted iterates (columns renormalised);
    an extrapolated sweep is kept if it ends within the bound with smaller norms, and beta grows, else
    it is dropped, beta shrinks and the next sweep starts from the last accepted iterate. Everything
    runs in float64.

    Returns ``(weights, factors, norms, n_iter, errors)``: ``norms`` is sum(weights^2) / ||X||^2 and
    ``errors`` the relative error of the accepted iterate after every sweep (a dropped sweep repeats
    the last values); convergence (a change of the norms below ``tol``) is tested on kept sweeps.
    """
    n_modes = x.ndim
    xd = x.double()
    cur = [_normalise_columns(f.double())[0] for f in factors]
    lam = weights.double().clone()
    norm_x2 = float(xd.square().sum())
    c = max(norm_x2 - float(delta) ** 2, 0.0)
    eps, tiny = torch.finfo(torch.float64).eps, torch.finfo(torch.float64).tiny
    best = float(lam.square().sum()) / norm_x2
    before, start, extrapolated = cur, cur, False
    beta, beta_max = _EPC_BETA0, _EPC_BETA_MAX0
    cur_err = math.nan
    norms, errors = [], []
    for _ in range(n_iter_max):
        new = list(start)
        for n in range(n_modes):
            others = [new[m] for m in range(n_modes) if m != n]
            w = torch.ones(lam.shape[0], lam.shape[0], dtype=torch.float64, device=x.device)
            for f in others:
                w = w * (f.T @ f)
            s, v = torch.linalg.eigh(w)
            s = s.clamp_min(max(float(s.max()), tiny) * 10 * eps)  # a ridge of a few ulps
            z_mat = (unfold(xd, n) @ khatri_rao(others)) @ v
            z = z_mat.square().sum(0)
            d = float((z / s).sum()) - c
            reach = d > 0
            if reach:
                kappa = _epc_secular_kappa(s, z, d)
                scale = kappa / (1 + s * kappa)  # 1 / (s + mu), mu = 1 / kappa
            else:
                scale = 1 / s
            new[n], new_lam = _normalise_columns((z_mat * scale) @ v.T)
        new_norm = float(new_lam.square().sum()) / norm_x2
        accept = not extrapolated or (reach and new_norm <= best)
        if accept:
            old = best
            before, cur, lam, best = cur, new, new_lam, new_norm
            cur_err = float(torch.linalg.vector_norm(xd - cp_to_tensor(lam, cur)) / norm_x2 ** 0.5)
            if extrapolated:
                beta, beta_max = min(beta * _EPC_GROW, beta_max), min(beta_max * _EPC_GROW_MAX, 1.0)
        else:
            beta_max, beta = beta, beta / _EPC_SHRINK
        norms.append(best)
        errors.append(cur_err)
        if accept and len(norms) > 1 and abs(old - best) < tol:
            break
        extrapolated = accept and reach
        start = cur if not extrapolated else [cur[0]] + [
            _normalise_columns(u + beta * (u - p))[0] for u, p in zip(cur[1:], before[1:])]
    return lam.to(x.dtype), [f.to(x.dtype) for f in cur], norms, len(norms), errors


def tucker_hosvd(x: torch.Tensor, ranks: list[int], modes: list[int]):
    """Truncated HOSVD: leading left singular vectors of each unfolding; returns ``(core, factors)``."""
    factors = [_leading_left_singular_vectors(unfold(x, m), r) for m, r in zip(modes, ranks)]
    core = x
    for f, m in zip(factors, modes):
        core = mode_dot(core, f.T, m)
    return core, factors


def tucker_hooi(x: torch.Tensor, init: list[torch.Tensor], modes: list[int], n_iter_max: int = 100,
                tol: float = 1e-7):
    """HOOI from the factors ``init``; returns ``(core, factors, errors, n_iter)``."""
    factors = [f.clone() for f in init]
    norm_x = torch.linalg.vector_norm(x)
    errors: list[float] = []
    core = None
    for _ in range(n_iter_max):
        for i, m in enumerate(modes):
            y = x
            for j, mj in enumerate(modes):
                if j != i:
                    y = mode_dot(y, factors[j].T, mj)
            factors[i] = _leading_left_singular_vectors(unfold(y, m), factors[i].shape[1])
            if i == len(modes) - 1:
                core = mode_dot(y, factors[i].T, m)
        err = torch.linalg.vector_norm(x - tucker_to_tensor(core, factors, modes)) / norm_x
        errors.append(float(err))
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    return core, factors, errors, len(errors)


def mode_contract(y: torch.Tensor, u: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[b, .., r] = sum_j y[b, .., j, .., r] * u[b, j, r]`` (``dim`` counts the batch dimension)."""
    shape = [1] * y.ndim
    shape[0], shape[dim], shape[-1] = u.shape[0], u.shape[1], u.shape[2]
    return (y * u.reshape(shape)).sum(dim)


def cp_conv2d(x: torch.Tensor, first: torch.Tensor, spatial: torch.Tensor, last: torch.Tensor, bias,
              stride, padding, dilation, relu: bool = False) -> torch.Tensor:
    """The CP-factorised convolution as the chain of three convolutions.

    ``first`` [R, C_in] (1x1 conv), ``spatial`` [R, kh, kw] (depthwise conv with ``stride``, zero
    ``padding`` and ``dilation``), ``last`` [C_out, R] (1x1 conv), ``bias`` [C_out] or None; then a
    ReLU where ``relu``.
    """
    y = F.conv2d(x, first[:, :, None, None])
    y = F.conv2d(y, spatial[:, None], None, tuple(stride), tuple(padding), tuple(dilation), groups=first.shape[0])
    y = F.conv2d(y, last[:, :, None, None], bias)
    return F.relu(y) if relu else y


def tucker_conv2d(x: torch.Tensor, first: torch.Tensor, core: torch.Tensor, last: torch.Tensor, bias,
                  stride, padding, dilation, relu: bool = False) -> torch.Tensor:
    """The Tucker-2-factorised convolution as the chain of three convolutions.

    ``first`` [R_in, C_in] (1x1 conv), ``core`` [R_out, R_in, kh, kw] (conv with ``stride``, zero
    ``padding`` and ``dilation``), ``last`` [C_out, R_out] (1x1 conv), ``bias`` [C_out] or None; then a
    ReLU where ``relu``.
    """
    y = F.conv2d(x, first[:, :, None, None])
    y = F.conv2d(y, core, None, tuple(stride), tuple(padding), tuple(dilation))
    y = F.conv2d(y, last[:, :, None, None], bias)
    return F.relu(y) if relu else y
