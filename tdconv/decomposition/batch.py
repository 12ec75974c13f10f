"""Many decompositions in few extension calls: tensors of equal shape are stacked into one batch."""
from __future__ import annotations

import concurrent.futures
import numbers
import os
from typing import Sequence

import torch

from ._common import _check_float, _check_int, _check_modes, _check_seed, _check_tensor, _check_tucker_ranks
from .cp import _check_cp_args, _cp_als_group, _with_epc
from .tucker import _tucker_group

__all__ = ["decompose_batch"]


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
    rank : int, tuple, or a list with one entry per tensor
        The rank (CP) or ranks (Tucker, a tuple with one rank per decomposed mode) of every tensor, or a
        *list* with one such value per tensor. A Tucker list of ints as long as both the tensors and the
        modes could mean either, and is refused: give a tuple for ranks shared by every tensor.
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
        raise ValueError(f"rank is a list of {len(rank)} entries for {n} tensors (one rank per tensor; give a "
                         "tuple for Tucker ranks shared by every tensor)")
    allowed = {"cp": {"n_iter_max", "tol", "init", "l2_reg", "seed", "epc"}, "hosvd": {"modes"},
               "hooi": {"modes", "n_iter_max", "tol"}}[method]
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unexpected options for method {method!r}: {sorted(unknown)} (allowed: {sorted(allowed)})")
    n_iter_max = _check_int(options.get("n_iter_max", 100), "n_iter_max")
    tol = _check_float(options.get("tol", 1e-7), "tol")
    l2_reg = _check_float(options.get("l2_reg", 0.0), "l2_reg")
    init = options.get("init", "svd")
    seed = _check_seed(options.get("seed"))
    epc = options.get("epc", False)
    if not isinstance(epc, bool):
        raise TypeError(f"epc must be True or False, got {epc!r}")
    xs, keys = [], []
    for i, t in enumerate(tensors):
        x = _check_tensor(t, f"tensors[{i}]")
        r = rank[i] if per_tensor else rank
        if method == "cp":
            r = _check_cp_args(r, n_iter_max, tol, init, l2_reg, tuple(x.shape))[0]
        else:
            modes = _check_modes(options.get("modes"), x.ndim)
            if per_tensor and i == 0 and len(rank) == len(modes) and all(
                    isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in rank):
                raise ValueError(f"rank={rank!r} is ambiguous for {n} tensors with {len(modes)} decomposed modes: "
                                 f"pass a tuple {tuple(rank)!r} for ranks shared by every tensor, or a list of "
                                 "tuples, one per tensor")
            r = (_check_tucker_ranks(r, tuple(x.shape), modes), modes)
        xs.append(x)
        keys.append((tuple(x.shape), x.dtype, x.device, r))
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)

    def job(key, x):
        if method == "cp":
            if epc:
                return lambda: _with_epc(x, _cp_als_group(x, key[3], n_iter_max, tol, init, l2_reg, seed), n_iter_max)
            return lambda: _cp_als_group(x, key[3], n_iter_max, tol, init, l2_reg, seed)
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
    # The caller's stream, read here: a worker thread's current stream is its device's default stream,
    # not the stream the caller made the stacked inputs on.
    callers = {dev: torch.cuda.current_stream(dev) for dev, _ in jobs if dev.type == "cuda"}
    sides = {i: torch.cuda.Stream(device=dev) for i, (dev, _) in enumerate(jobs) if dev.type == "cuda"}
    for i, side in sides.items():
        side.wait_stream(callers[jobs[i][0]])  # the inputs were written on the caller's stream

    def run(i: int):
        dev, j = jobs[i]
        if dev.type != "cuda":
            return j()
        with torch.cuda.device(dev), torch.cuda.stream(sides[i]):
            return j()

    outs = None
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            outs = list(pool.map(run, range(len(jobs))))
    finally:
        # The caller's stream waits for every side stream (no host synchronisation; also when a worker
        # raised, so that the inputs are not reused while a side stream still reads them), and the
        # caching allocator learns that the outputs made on a side stream are used on the caller's.
        for i, side in sides.items():
            caller = callers[jobs[i][0]]
            caller.wait_stream(side)
            for res in (outs[i] if outs is not None else []):
                for t in _tensors_of(res):
                    if t.device.type == "cuda":
                        t.record_stream(caller)
    return outs


def _tensors_of(res) -> list:
    """The tensors a CPTensor or TuckerTensor holds."""
    out = []
    for value in vars(res).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    return out
