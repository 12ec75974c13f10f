"""Decompositions of conv kernels ``[C_out, C_in, kh, kw]`` in the forms the factorised layers use."""
from __future__ import annotations

import torch

from ._common import _check_seed, _check_tensor
from ._containers import CPTensor
from .batch import decompose_batch
from .cp import cp_als
from .tucker import tucker_hooi

__all__ = ["KERNEL_METHODS", "decompose_kernel", "truncated_svd", "method_options"]

KERNEL_METHODS = ("cp", "cp4", "tucker", "svd")
GRAM_SVD_MIN = 1024  # truncated_svd of a matrix whose smaller side is at least this: from the Gram matrix
# The SVD is exact in one step: it accepts the iteration controls every method takes, and needs neither.
_OPTIONS = {"cp": {"n_iter_max", "tol", "init", "l2_reg", "epc"}, "tucker": {"n_iter_max", "tol"},
            "svd": {"n_iter_max", "tol"}}


def method_options(method: str) -> set:
    """The keyword options :func:`decompose_kernel` takes for ``method`` (``seed`` is taken by all)."""
    return _OPTIONS["tucker" if method == "tucker" else "svd" if method == "svd" else "cp"] | {"seed"}


def truncated_svd(matrix: torch.Tensor, rank: int) -> CPTensor:
    """The best rank-``rank`` approximation of a matrix (Eckart-Young) as a CP decomposition of order 2:
    the singular values as weights, the leading left and right singular vectors as factors. Computed in
    the matrix's precision (float32 for half precision) on its device."""
    m = _check_tensor(matrix, "matrix")
    if m.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(m.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m.shape):
        raise ValueError(f"rank must be an int in [1, {min(m.shape)}] for a {tuple(m.shape)} matrix, got {rank!r}")
    if min(m.shape) < GRAM_SVD_MIN:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
        norm = float(torch.linalg.vector_norm(m.double()))
    else:
        # A large layer (a VGG classifier's 4096 x 25088): the eigendecomposition of the smaller Gram
        # matrix, formed in float64, is ten times faster than a full SVD. The singular values it gives
        # are accurate to float64 rounding relative to the largest squared; the factors are the exact
        # projection U U^T W onto the leading singular subspace.
        md = m.double()
        tall = md.shape[0] > md.shape[1]
        a = md.T if tall else md
        ev, vecs = torch.linalg.eigh(a @ a.T)
        ev, vecs = ev.flip(0)[:rank].clamp_min(0), vecs.flip(1)[:, :rank]
        s = ev.sqrt()
        other = (a.T @ vecs) / s.clamp_min(torch.finfo(torch.float64).tiny)
        u, v = (other, vecs) if tall else (vecs, other)
        norm = float(torch.linalg.vector_norm(md))
        u, s, v = u.to(m.dtype), s.to(m.dtype), v.to(m.dtype)
    kept = float(s.double().square().sum())
    err = (max(norm ** 2 - kept, 0.0) ** 0.5) / norm
    return CPTensor(s.contiguous(), [u.contiguous(), v.contiguous()], errors=[err], n_iter=1, rel_error=err,
                    tensor_norm=norm)


def _per_group(rank, groups: int, method: str):
    if method == "tucker":
        return (rank[0] // groups, rank[1] // groups)
    return rank // groups


def decompose_kernel(weight: torch.Tensor, method: str, rank, *, groups: int = 1, seed: int | None = None,
                     **options):
    """The decomposition of a conv kernel that a :class:`~tdconv.FactorizedConv2d` of ``method`` is made of.

    Parameters
    ----------
    weight : Tensor [C_out, C_in, kh, kw]
    method : {"cp", "cp4", "tucker", "svd"}
        ``"cp"``: :func:`cp_als` of the order-3 kernel ``[C_out, C_in, kh*kw]``; ``"cp4"``: of the order-4
        kernel; ``"tucker"``: :func:`tucker_hooi` on the channel modes ``(0, 1)`` (Tucker-2); ``"svd"``:
        the truncated SVD (:func:`truncated_svd`) of a 1x1 kernel (or of a linear layer's ``[out, in]``
        weight) as a matrix.
    rank : int or (int, int)
        The CP rank R, the Tucker ranks ``(R_out, R_in)`` or the SVD rank R, of the whole layer: with
        ``groups`` > 1, multiples of ``groups``, each group getting ``R / groups``.
    groups : int
        The kernel is a grouped conv's ``[C_out, C_in / groups, kh, kw]``: each group's block
        ``[C_out / groups, C_in / groups, kh, kw]`` is decomposed on its own (in one batched call for CP
        and Tucker), and a list of the groups' decompositions is returned.
    seed : int, optional
        Seed of the CP initialisation. Accepted for every method, so that one set of options serves all;
        Tucker (HOOI from the HOSVD) is deterministic and does not use it.
    **options
        Of :func:`cp_als` (``n_iter_max``, ``tol``, ``init``, ``l2_reg``, ``epc``) or :func:`tucker_hooi`
        (``n_iter_max``, ``tol``).

    Returns
    -------
    CPTensor (cp, cp4, svd) or TuckerTensor, or a list of them (one per group) when ``groups`` > 1
    """
    if method not in KERNEL_METHODS:
        raise ValueError(f"method must be one of {KERNEL_METHODS}, got {method!r}")
    w = _check_tensor(weight, "weight")
    if method == "svd" and w.dim() == 2:
        w = w[:, :, None, None]
    if w.dim() != 4:
        raise ValueError(f"weight must be a conv kernel [C_out, C_in, kh, kw], got shape {tuple(w.shape)}")
    if method == "svd" and tuple(w.shape[2:]) != (1, 1):
        raise ValueError(f"method='svd' factorises 1x1 kernels (and linear layers), got a kernel of shape "
                         f"{tuple(w.shape)}; use 'tucker' or 'cp' for a spatial kernel")
    seed = _check_seed(seed)
    family = "tucker" if method == "tucker" else "svd" if method == "svd" else "cp"
    unknown = sorted(set(options) - _OPTIONS[family])
    if unknown:
        raise TypeError(f"unexpected decomposition options for method {method!r}: {unknown} "
                        f"(allowed: {sorted(_OPTIONS[family] | {'seed'})})")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or w.shape[0] % groups:
        raise ValueError(f"groups must be a positive int dividing the kernel's {w.shape[0]} output channels, got "
                         f"{groups!r}")
    c_out, c_in, kh, kw = w.shape
    blocks = list(w.chunk(groups, 0)) if groups > 1 else [w]
    if groups > 1:
        for name, r in (("rank", rank),) if method != "tucker" else (("rank (R_out)", rank[0]), ("rank (R_in)", rank[1])):
            if isinstance(r, bool) or not isinstance(r, int) or r % groups:
                raise ValueError(f"{name} must be a multiple of groups={groups} (each group gets an equal share), "
                                 f"got {r!r}")
        rank = _per_group(rank, groups, method)
    if method == "svd":
        out = [truncated_svd(b.reshape(b.shape[0], -1), rank) for b in blocks]
    elif method == "tucker":
        out = ([tucker_hooi(w, rank, modes=(0, 1), **options)] if groups == 1 else
               decompose_batch(blocks, "hooi", tuple(rank), modes=(0, 1), **options))
    else:
        xs = [b.reshape(b.shape[0], c_in, kh * kw) if method == "cp" else b for b in blocks]
        out = ([cp_als(xs[0], rank, seed=seed, **options)] if groups == 1 else
               decompose_batch(xs, "cp", rank, seed=seed, **options))
    return out[0] if groups == 1 else out
