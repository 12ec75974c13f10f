"""Rank selection: fixed ranks (``tdconv.nn.resolve_rank``) and ranks fitted to a whole-model budget.

A budget (``target_macs=0.5``: half the model's MACs; ``target_params=0.3``) is met by a greedy
allocation over per-layer error-versus-rank curves: starting from rank 1 everywhere, the rank change with
the largest decrease of the layer's normalised error per added MAC (or parameter) is taken while it
fits (the best jump to any higher rank, as curves are not concave), so that the sum of the per-layer
normalised errors stays small. The curves are cheap, from one
eigendecomposition per channel mode: with ``t_n(r)`` the energy of mode n's singular values beyond the
r-th over ``||W||^2``, the normalised error of a Tucker-2 layer at ranks ``(R_out, R_in)`` is estimated
as ``sqrt(1 - (1 - t_0(R_out)) (1 - t_1(R_in)))`` (the energy kept is the product of what each mode
keeps when the energy factors over the modes; it lies between the single-mode loss and the HOSVD bound
``t_0 + t_1``). A CP layer of rank R is priced with its (R, R) estimate, which ranks layers by how
compressible their channel modes are (a CP fit is never better; the report gives the actual errors). Budget that is left
once every curve is flat (CP ranks past the channel counts, where the bound is zero) is spread evenly
over the layers, one rank step each in turn.
"""
from __future__ import annotations

import math

import numpy as np

import torch
from torch import nn

__all__ = ["mode_tails", "allocate_budget"]


def mode_tails(weight: torch.Tensor) -> tuple:
    """For the kernel ``[C_out, C_in, kh, kw]``: ``(tail_0, tail_1)``, float64 CPU tensors of sizes
    C_out + 1 and C_in + 1 where ``tail_n[r]`` is the energy beyond the r leading singular values of the
    mode-n unfolding, over ``||W||^2``."""
    w = weight.detach().to(torch.float64)
    total = float(w.square().sum())
    tails = []
    for mode in (0, 1):
        u = w.movedim(mode, 0).reshape(w.shape[mode], -1)
        ev = torch.linalg.eigvalsh(u @ u.T).flip(0).clamp_min(0).cpu()  # descending
        tail = torch.cat([ev.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        tails.append(tail / total if total > 0 else tail)
    return tuple(tails)


def _error(tails, method, rank) -> float:
    t0, t1 = tails
    r_out, r_in = rank if method == "tucker" else (rank, rank)
    a, b = float(t0[min(r_out, len(t0) - 1)]), float(t1[min(r_in, len(t1) - 1)])
    # Energy kept ~ the product of the fractions each mode keeps (exact when the energy factors over
    # the two modes); never below the larger single-mode loss, which no truncation can beat.
    return math.sqrt(min(1.0, max(a, b, 1.0 - (1.0 - a) * (1.0 - b))))


def _path(layer, method, cost) -> list:
    """Ranks a layer may take, in steps of 1/64 of its channels (Tucker: both ranks together, in
    proportion to their channels), from rank 1 up to where the factorised form would cost more than the
    dense conv."""
    p = layer["probe"]
    so, si = max(1, p.out_channels // 64), max(1, p.in_channels // 64)
    path = [(1, 1) if method == "tucker" else 1]
    while True:
        r = path[-1]
        if method == "tucker":
            if r[0] >= p.out_channels and r[1] >= p.in_channels:
                break
            nxt = (min(p.out_channels, r[0] + so), min(p.in_channels, r[1] + si))
        else:
            nxt = r + so
        if cost(layer, nxt) > layer["dense_cost"]:
            break
        path.append(nxt)
    return path


def allocate_budget(layers: list, method: str, budget: int, metric: str) -> dict:
    """Ranks for ``layers`` whose total cost is at most ``budget`` and as close to it as rank steps allow.

    ``layers``: dicts with ``name``, ``probe`` (a FactorizedConv2d of the layer's geometry: its
    ``macs(hw, rank)`` / ``num_params(rank)`` price any rank), ``hw`` (the layer's input size), ``tails``
    (:func:`mode_tails`) and ``dense_cost``. Returns ``{name: rank}``.

    The curves are not concave (a large layer gains little from its first steps), so each move is
    the jump, to any higher rank that fits, with the best error decrease per unit of cost (the
    convex-hull greedy of a multiple-choice knapsack), not merely the next step.
    """
    def cost(layer, rank):
        p = layer["probe"]
        return p.macs(layer["hw"], rank) if metric == "macs" else p.num_params(rank)

    paths, costs, errors, pos = {}, {}, {}, {}
    for layer in layers:
        name = layer["name"]
        paths[name] = _path(layer, method, cost)
        costs[name] = np.array([cost(layer, r) for r in paths[name]], dtype=np.float64)
        errors[name] = np.array([_error(layer["tails"], method, r) for r in paths[name]], dtype=np.float64)
        pos[name] = 0
    spent = float(sum(c[0] for c in costs.values()))
    if spent > budget:
        raise ValueError(f"the budget is unreachable: the selected layers cost {int(spent)} {metric} at rank 1, "
                         f"more than the {budget} left for them")
    while True:
        best = None
        for name in paths:
            i, c, e = pos[name], costs[name], errors[name]
            dc = c[i + 1:] - c[i]
            fits = (dc > 0) & (dc <= budget - spent)
            if not fits.any():
                continue
            slope = np.where(fits, (e[i] - e[i + 1:]) / np.where(dc > 0, dc, 1.0), -np.inf)
            j = int(np.argmax(slope))
            if slope[j] > 0 and (best is None or slope[j] > best[0]):
                best = (slope[j], name, i + 1 + j)
        if best is None:
            break
        _, name, j = best
        spent += costs[name][j] - costs[name][pos[name]]
        pos[name] = j
    # Budget left once the curves are flat (a CP rank past the channel count, where the estimate is
    # zero) is spread evenly, one step per layer in turn.
    grew = True
    while grew:
        grew = False
        for name in paths:
            i = pos[name]
            if i + 1 < len(paths[name]) and spent + costs[name][i + 1] - costs[name][i] <= budget:
                spent += costs[name][i + 1] - costs[name][i]
                pos[name] = i + 1
                grew = True
    return {name: paths[name][pos[name]] for name in paths}
