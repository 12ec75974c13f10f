"""The factor <-> layer mapping: plain functions between decompositions and the layers' parameters.

A factorised layer of a kernel ``W[C_out, C_in, kh, kw]`` keeps ``first`` [R_in, C_in, 1, 1], ``spatial``
(CP: [R, 1, kh, kw]; cp4: [R, 1, kh, 1] with ``spatial_w`` [R, 1, 1, kw]; Tucker: the core
[R_out, R_in, kh, kw]) and ``last`` [C_out, R_out, 1, 1]. An SVD layer (``"svd"``, a 1x1 kernel) keeps
``first`` and ``last`` only.

A grouped layer (``groups=G``) is block diagonal: group g's factors are the g-th of G equal slices of
each parameter along its first dimension, ``first`` [R_in, C_in / G, 1, 1], the Tucker core
[R_out, R_in / G, kh, kw] and ``last`` [C_out, R_out / G, 1, 1], run as grouped convolutions (CP's
depthwise factor is per component already).
"""
from __future__ import annotations

import torch

__all__ = ["factors_from_groups", "factors_from_cp", "factors_from_tucker", "kernel_from_factors", "cp_component_norms",
           "cp_sensitivity"]


def factors_from_groups(parts: list) -> dict:
    """A grouped layer's parameters from the parameters of each group's layer (in group order)."""
    return {name: torch.cat([p[name] for p in parts], 0) for name in parts[0]}


def factors_from_cp(cp, method: str, kernel_shape) -> dict:
    """The layer's parameters from a CP decomposition of its kernel (order 3 for ``"cp"``, order 4 for
    ``"cp4"``, order 2 for ``"svd"``: the SVD ``U diag(s) V^T`` of the 1x1 kernel as a matrix). Each component's norm (its weight) is spread equally over its factors: the function is
    unchanged, and SGD on such factors is well conditioned (factors straight out of ALS differ in scale
    by 20-220x, and fine-tuning them destroys accuracy)."""
    c_out, c_in, kh, kw = kernel_shape
    weights, factors = cp
    scale = weights.abs() ** (1.0 / len(factors))
    sign = torch.where(weights < 0, -1.0, 1.0).to(weights)
    a, b, *spatial = [f * scale for f in factors]
    a = a * sign  # a negative weight stays in the last factor
    out = {"last": a.reshape(c_out, -1, 1, 1), "first": b.t().reshape(-1, c_in, 1, 1)}
    if method == "svd":
        if spatial:
            raise ValueError(f"an SVD layer is made of a matrix factorisation (2 factors), got {len(factors)}")
    elif method == "cp":
        out["spatial"] = spatial[0].t().reshape(-1, 1, kh, kw)
    elif method == "cp4":
        out["spatial"] = spatial[0].t().reshape(-1, 1, kh, 1)
        out["spatial_w"] = spatial[1].t().reshape(-1, 1, 1, kw)
    else:
        raise ValueError(f"method must be 'cp', 'cp4' or 'svd' for a CP decomposition, got {method!r}")
    return out


def factors_from_tucker(tucker, kernel_shape) -> dict:
    """The layer's parameters from a Tucker-2 decomposition of its kernel on modes ``(0, 1)``."""
    c_out, c_in = kernel_shape[:2]
    if tuple(tucker.modes) != (0, 1):
        raise ValueError(f"a Tucker-2 layer needs a decomposition of the channel modes (0, 1), got modes "
                         f"{tuple(tucker.modes)}")
    u_out, u_in = tucker.factors
    return {"last": u_out.reshape(c_out, -1, 1, 1), "first": u_in.t().reshape(-1, c_in, 1, 1), "spatial": tucker.core}


def _chunks(t, groups):
    return [None] * groups if t is None else t.chunk(groups, 0)


def kernel_from_factors(method: str, first, spatial, last, spatial_w=None, groups: int = 1) -> torch.Tensor:
    """The dense kernel ``[C_out, C_in / groups, kh, kw]`` the layer's parameters compute."""
    if groups > 1:
        return torch.cat([kernel_from_factors(method, *parts) for parts in
                          zip(*(_chunks(t, groups) for t in (first, spatial, last, spatial_w)))], 0)
    first = first.flatten(1)  # [R_in, C_in]
    last = last.flatten(1)    # [C_out, R_out]
    if method == "svd":
        return (last @ first)[:, :, None, None]
    if method == "tucker":
        return torch.einsum("or,rshw,si->oihw", last, spatial, first)
    spatial = spatial[:, 0]  # [R, kh, kw] or [R, kh, 1]
    if method == "cp4":
        spatial = spatial * spatial_w[:, 0]  # [R, kh, 1] * [R, 1, kw]
    return torch.einsum("or,rhw,ri->oihw", last, spatial, first)


def _cp_factor_matrices(method, first, spatial, last, spatial_w=None, groups: int = 1) -> list:
    """The CP layer's factors as ``[R, I_n]`` matrices, one per mode (a grouped layer's: each component
    with the entries of its own group)."""
    last_t = torch.cat([blk.t() for blk in last.flatten(1).chunk(groups, 0)], 0)
    out = [last_t, first.flatten(1), spatial.flatten(1)]
    if method == "cp4":
        out.append(spatial_w.flatten(1))
    return out


def cp_component_norms(method, first, spatial, last, spatial_w=None, groups: int = 1) -> torch.Tensor:
    """``[R]``: the norm of each rank-1 term of a CP layer's kernel, the product of its factors' norms."""
    if method not in ("cp", "cp4"):
        raise ValueError(f"component norms are defined for CP layers (method 'cp' or 'cp4'), not {method!r}")
    norms = [f.norm(dim=1) for f in _cp_factor_matrices(method, first, spatial, last, spatial_w, groups)]
    return torch.stack(norms).prod(0).detach()


def cp_sensitivity(method, first, spatial, last, spatial_w=None, kernel_norm: float = 1.0, groups: int = 1) -> float:
    """The sensitivity of Phan et al. (ECCV 2020) of a CP layer's factors as stored:
    ``sum_n I_n sum_r prod_{m != n} ||f_{m,r}||^2``, over ``kernel_norm ** (2 (N - 1) / N)``."""
    with torch.no_grad():
        factors = _cp_factor_matrices(method, first, spatial, last, spatial_w, groups)
        sq = torch.stack([f.double().square().sum(1) for f in factors])  # [N, R]
        total = sum(f.shape[1] * float((sq.prod(0) / sq[n].clamp_min(1e-300)).sum()) for n, f in enumerate(factors))
    n = len(factors)
    return total / kernel_norm ** (2.0 * (n - 1) / n) if kernel_norm > 0 else float("nan")
