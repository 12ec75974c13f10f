"""Every rank rule: fixed ranks and fractions (:func:`resolve_rank`), data-driven ranks (EVBMF, energy),
ranks fitted to a whole-model budget (:func:`budget_ranks`), and the one cost function that prices a
layer at any rank (:func:`layer_cost`).

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
import numbers

import numpy as np

import torch

from .decomposition import KERNEL_METHODS as METHODS
from .geometry import ConvGeometry
from .utils import conv_macs

__all__ = ["METHODS", "resolve_rank", "layer_cost", "data_rank", "evbmf_rank", "energy_rank", "mode_tails",
           "allocate_budget", "budget_ranks"]

METRICS = ("macs", "params")


# ---------------------------------------------------------------------------------------------- fixed ranks
def positive_int(value, name: str) -> int:
    """``value`` as an int when it is a positive integer (NumPy's included); else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _is_fraction(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (numbers.Integral, bool))


def resolve_rank(rank, method: str, out_channels: int, in_channels: int, groups: int = 1):
    """The rank(s) a ``rank`` argument means for a conv with these channel counts.

    ``rank`` is an int (CP, SVD) or a pair ``(R_out, R_in)`` (Tucker), or a real number in (0, 1] (a
    Python or NumPy float): that fraction of the channels (CP: of ``out_channels``; Tucker: of each
    channel mode; SVD: of the smaller of the two), at least 1. A grouped layer (``groups`` > 1) has
    ranks that are multiples of ``groups`` (each group an equal share; a fraction is taken of each
    group's channels). Tucker and SVD ranks are at most the channels (SVD: the smaller count).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    g = positive_int(groups, "groups")
    if out_channels % g or in_channels % g:
        raise ValueError(f"groups={g} must divide both channel counts ({out_channels} out, {in_channels} in)")
    c_out, c_in = out_channels // g, in_channels // g  # per group
    if _is_fraction(rank):
        rank = float(rank)
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"rank as a fraction of the channels must be in (0, 1], got {rank}")
        # floor(rank * C), robust to the rounding of the fraction itself (0.29 * 100 is 28.999...; a float32
        # 0.7 is 0.69999999): a fraction names the channel count it is closest to from below.
        def of(channels):
            return g * max(1, math.floor(rank * channels + 1e-6))
        if method == "tucker":
            return (of(c_out), of(c_in))
        return of(min(c_out, c_in) if method == "svd" else c_out)

    def share(value, name, limit=None):
        value = positive_int(value, name)
        if value % g:
            raise ValueError(f"{name} {value} must be a multiple of groups={g} (each group gets an equal share)")
        if limit is not None and value > limit * g:
            raise ValueError(f"{name} {value} out of range: at most {limit * g} for this layer")
        return value

    if method == "tucker":
        if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
            rank = (rank, rank)
        try:
            r_out, r_in = rank
        except (TypeError, ValueError):
            raise ValueError(f"rank for method='tucker' must be an int, a pair (R_out, R_in) or a fraction, "
                             f"got {rank!r}") from None
        r_out, r_in = share(r_out, "rank (R_out)"), share(r_in, "rank (R_in)")
        if r_out > out_channels or r_in > in_channels:
            raise ValueError(f"rank {(r_out, r_in)} out of range: Tucker ranks must be at most "
                             f"(out_channels, in_channels) = {(out_channels, in_channels)}")
        return (r_out, r_in)
    if method == "svd":
        r = share(rank, "rank")
        if r > g * min(c_out, c_in):
            raise ValueError(f"rank {r} out of range: an SVD rank is at most the smaller channel count "
                             f"{g * min(c_out, c_in)} (out {out_channels}, in {in_channels})")
        return r
    return share(rank, "rank")


# ---------------------------------------------------------------------------------------------- cost
def layer_cost(geometry: ConvGeometry, method: str, rank, metric: str, in_hw=None) -> int:
    """Parameters, or MACs of one image of spatial size ``in_hw``, of a conv of ``geometry`` kept dense
    (``method="dense"``) or factorised by ``method`` at ``rank``.

    MACs are counted as ptflops counts the chain of standard convolutions the layer is equivalent to
    (:meth:`tdconv.FactorizedConv2d.to_chain`): the first 1x1 at the input's resolution, the spatial
    conv(s) at theirs (cp4's ``kh x 1`` conv keeps the input's width, padded where the chain pads
    explicitly), the last 1x1 and the bias at the output's. A grouped layer's 1x1 and core convolutions
    are grouped (``groups`` of the geometry). An SVD layer is two 1x1 convs, the first with the
    layer's stride, both at the output's resolution. A linear layer is priced as a 1x1 conv whose
    "image" is its rows (``in_hw = (rows, 1)``), as ptflops counts ``nn.Linear``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    g = geometry
    kh, kw = g.kernel_size
    groups = g.groups
    bias = g.out_channels if g.bias else 0
    if method == "dense":
        if metric == "params":
            return int(g.out_channels * (g.in_channels // groups) * kh * kw + bias)
        return conv_macs(g.in_channels, g.out_channels, g.kernel_size, g.output_size(in_hw), groups=groups,
                         bias=g.bias)
    if method not in METHODS:
        raise ValueError(f"method must be 'dense' or one of {METHODS}, got {method!r}")
    r_out, r_in = tuple(rank) if method == "tucker" else (rank, rank)
    c_in_g = g.in_channels // groups
    first = r_in * c_in_g                    # per pixel of the first 1x1 (grouped)
    last = g.out_channels * (r_out // groups)
    if method == "svd":
        if metric == "params":
            return int(first + last + bias)
        ho, wo = g.output_size(in_hw)
        return int((first + last + bias) * ho * wo)
    spatial = {"cp": r_in * kh * kw, "cp4": r_in * (kh + kw), "tucker": r_out * (r_in // groups) * kh * kw}[method]
    if metric == "params":
        return int(first + spatial + last + bias)
    h, w = in_hw
    ho, wo = g.output_size(in_hw)
    macs = first * h * w + (last + bias) * ho * wo
    if method == "cp4":  # kh x 1 at (Ho, W'), then 1 x kw at (Ho, Wo); W' is W, padded when the chain pads first
        pad = g.explicit_pad
        w_mid = w + (pad[0] + pad[1] if pad is not None else 0)
        return int(macs + r_in * kh * ho * w_mid + r_in * kw * ho * wo)
    return int(macs + spatial * ho * wo)


# ---------------------------------------------------------------------------------------------- budgets


def mode_tails(weight: torch.Tensor, groups: int = 1) -> tuple:
    """For the kernel ``[C_out, C_in, kh, kw]`` (or a linear layer's ``[out, in]``): ``(tail_0, tail_1)``,
    float64 CPU tensors of sizes C_out + 1 and C_in + 1 where ``tail_n[r]`` is the energy beyond the r
    leading singular values of the mode-n unfolding, over ``||W||^2``.

    A grouped kernel (``[C_out, C_in / groups, kh, kw]``, ``groups`` > 1) is factorised per group at
    equal ranks: ``tail_n[r]`` is then the energy beyond r singular values in every group, summed over
    the groups, over ``||W||^2`` (sizes C_out / groups + 1 and C_in / groups + 1)."""
    w = weight.detach().to(torch.float64)
    if w.dim() == 2:
        w = w[:, :, None, None]
    total = float(w.square().sum())
    blocks = w.chunk(groups, 0) if groups > 1 else [w]
    tails = []
    for mode in (0, 1):
        if mode == 1 and w.shape[2] * w.shape[3] == 1 and groups == 1:
            # a matrix (1x1 kernel, linear layer): the two unfoldings share their singular values
            ev_tail = tails[0]
            size = w.shape[1] + 1
            if ev_tail.numel() >= size:  # (zero beyond the smaller channel count)
                tails.append(ev_tail[:size].clone())
            else:
                tails.append(torch.cat([ev_tail, ev_tail.new_zeros(size - ev_tail.numel())]))
            continue
        acc = None
        for b in blocks:
            u = b.movedim(mode, 0).reshape(b.shape[mode], -1)
            # The squared singular values, from the smaller of the two Gram matrices (a linear layer's
            # 25088 inputs would otherwise make a 25088 x 25088 one), zero beyond its size.
            gram = u @ u.T if u.shape[0] <= u.shape[1] else u.T @ u
            ev = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).cpu()  # descending
            if ev.numel() < u.shape[0]:
                ev = torch.cat([ev, ev.new_zeros(u.shape[0] - ev.numel())])
            tail = torch.cat([ev.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
            acc = tail if acc is None else acc + tail
        tails.append(acc / total if total > 0 else acc)
    return tuple(tails)


def _error(tails, method, rank, groups: int = 1) -> float:
    """The estimated normalised error of a layer at ``rank`` (``None``: dense, no error)."""
    if rank is None:
        return 0.0
    t0, t1 = tails
    r_out, r_in = rank if method == "tucker" else (rank, rank)
    r_out, r_in = r_out // groups, r_in // groups
    a, b = float(t0[min(r_out, len(t0) - 1)]), float(t1[min(r_in, len(t1) - 1)])
    if method == "svd":  # Eckart-Young: exactly the energy beyond the rank
        return math.sqrt(min(1.0, a))
    # Energy kept ~ the product of the fractions each mode keeps (exact when the energy factors over
    # the two modes); never below the larger single-mode loss, which no truncation can beat.
    return math.sqrt(min(1.0, max(a, b, 1.0 - (1.0 - a) * (1.0 - b))))


def floor_rank(geometry: ConvGeometry, method: str, min_rank: float):
    """The smallest rank a layer may take: ``min_rank`` of its channels (per group), at least 1 per group."""
    g = geometry.groups
    co, ci = geometry.out_channels // g, geometry.in_channels // g

    def of(c):
        return g * max(1, math.ceil(min_rank * c))
    if method == "tucker":
        return (of(co), of(ci))
    return of(min(co, ci)) if method == "svd" else of(co)


def _other_cheaper(layer, rank) -> bool:
    """Whether the layer at ``rank`` also costs less than its dense form in the metric the budget is not
    about (parameters for a MAC budget, MACs for a parameter budget)."""
    other = layer.get("other_metric")
    if other is None:
        return True
    g = layer["geometry"]
    return layer_cost(g, layer["method"], rank, other, layer["hw"]) < layer_cost(g, "dense", None, other, layer["hw"])


def _path(layer, cost, min_rank) -> list:
    """Ranks a layer may take, in steps of 1/64 of its channels (Tucker: both ranks together, in
    proportion to their channels; grouped layers: whole steps per group), from its floor up to where
    the factorised form would cost as much as the dense conv in either metric, then ``None``: the
    layer left dense."""
    p, method = layer["geometry"], layer["method"]
    g = p.groups
    co, ci = p.out_channels // g, p.in_channels // g
    so, si = g * max(1, co // 64), g * max(1, ci // 64)
    top = g * min(co, ci) if method == "svd" else None
    path = []
    r = floor_rank(p, method, min_rank)
    while cost(layer, r) < layer["dense_cost"] and _other_cheaper(layer, r):
        path.append(r)
        if method == "tucker":
            if r[0] >= p.out_channels and r[1] >= p.in_channels:
                break
            r = (min(p.out_channels, r[0] + so), min(p.in_channels, r[1] + si))
        else:
            if top is not None and r >= top:
                break
            r = r + (si if method == "svd" and ci < co else so)
            if top is not None:
                r = min(r, top)
    return path + [None]


def allocate_budget(layers: list, method: str | None, budget: int, metric: str, min_rank: float = 0.0) -> dict:
    """Ranks for ``layers`` whose total cost is at most ``budget`` and as close to it as rank steps allow.

    ``layers``: dicts with ``name``, ``geometry`` (the factorised layer's :class:`ConvGeometry`, priced at
    any rank by :func:`layer_cost`), ``hw`` (the layer's input size), ``tails``
    (:func:`mode_tails`), ``dense_cost`` and ``method`` (else ``method`` applies). No layer goes below
    ``min_rank`` of its channels. Returns ``{name: rank}``, where a rank of ``None`` means the layer
    is best left dense (every factorised rank it could take would cost as much, or the budget has room
    for its dense form).

    The curves are not concave (a large layer gains little from its first steps), so each move is
    the jump, to any higher rank that fits, with the best error decrease per unit of cost (the
    convex-hull greedy of a multiple-choice knapsack), not merely the next step.
    """
    def cost(layer, rank):
        if rank is None:
            return layer["dense_cost"]
        return layer_cost(layer["geometry"], layer["method"], rank, metric, layer["hw"])

    paths, costs, errors, pos = {}, {}, {}, {}
    for layer in layers:
        layer.setdefault("method", method)
        layer.setdefault("other_metric", "params" if metric == "macs" else "macs")
        name = layer["name"]
        paths[name] = _path(layer, cost, min_rank)
        costs[name] = np.array([cost(layer, r) for r in paths[name]], dtype=np.float64)
        errors[name] = np.array([_error(layer["tails"], layer["method"], r, layer["geometry"].groups)
                                 for r in paths[name]], dtype=np.float64)
        pos[name] = 0
    spent = float(sum(c[0] for c in costs.values()))
    if spent > budget:
        raise ValueError(f"the budget is unreachable: the selected layers cost {int(spent)} {metric} at their "
                         f"smallest ranks, "
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
    # zero) is spread evenly, one step per layer in turn (never into the dense form, which gains nothing
    # there).
    grew = True
    while grew:
        grew = False
        for name in paths:
            i = pos[name]
            if i + 2 < len(paths[name]) and spent + costs[name][i + 1] - costs[name][i] <= budget:
                spent += costs[name][i + 1] - costs[name][i]
                pos[name] = i + 1
                grew = True
    return {name: paths[name][pos[name]] for name in paths}


def budget_ranks(layers: dict, method: str | None, total: int, metric: str, target: float, min_rank: float = 0.0,
                 fixed: dict | None = None, tails: dict | None = None) -> dict:
    """Ranks that bring a whole model of cost ``total`` (MACs or parameters, ``metric``) to ``target``
    (a fraction of it) by factorising ``layers``.

    ``layers``: ``{name: (geometry of the factorised layer, input size (H, W), dense cost, weight)}``, or
    ``(..., weight, method)`` where layers differ in method (``method`` applies to the others);
    ``fixed``: ``{name: rank}`` for those of them whose rank is given (they are priced, not chosen);
    ``tails``: ``{name: (tail_out, tail_in)}`` error curves to use instead of the weight's
    :func:`mode_tails` (from calibration data: :func:`tdconv.calibration.data_tails`).
    A rank of ``None`` in the result: the layer is best left dense.
    Raises ``ValueError`` with the achievable range when the target cannot be met within 2 %.
    """
    fixed = fixed or {}
    budget = int(math.floor(target * total))
    spent_elsewhere = total
    free = []
    for name, entry in layers.items():
        geometry, hw, dense, weight = entry[:4]
        m = entry[4] if len(entry) > 4 else method
        spent_elsewhere -= dense
        if name in fixed:
            spent_elsewhere += layer_cost(geometry, m, fixed[name], metric, hw)
            continue
        free.append({"name": name, "geometry": geometry, "hw": hw, "dense_cost": dense, "method": m,
                     "tails": (tails or {}).get(name) or mode_tails(weight, geometry.groups)})
    if not free:
        return {}

    def priced(f, rank):
        return f["dense_cost"] if rank is None else layer_cost(f["geometry"], f["method"], rank, metric, f["hw"])

    try:
        ranks = allocate_budget(free, method, budget - spent_elsewhere, metric, min_rank)
    except ValueError as exc:
        low = spent_elsewhere + sum(priced(f, _path(f, priced, min_rank)[0]) for f in free)
        where = "at rank 1" if min_rank == 0 else f"at min_rank={min_rank}"
        raise ValueError(f"target_{metric}={target} is unreachable by factorising these layers: the smallest "
                         f"achievable is {low / total:.4f} of the model's {metric} (every selected layer {where})"
                         ) from exc
    achieved = spent_elsewhere + sum(priced(f, ranks[f["name"]]) for f in free)
    if achieved < 0.98 * budget:
        raise ValueError(f"target_{metric}={target} cannot be met within 2 %: the ranks these layers can take "
                         f"(each up to its dense cost, or dense) come no closer than {achieved / total:.4f} of the "
                         f"model's {metric}; select more layers or choose another target")
    return ranks


# ---------------------------------------------------------------------------------------------- data-driven ranks
def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The VB shrinkage factor of Nakajima et al. (2013) for normalised squared singular values x."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + torch.sqrt((b * b - 4.0 * alpha).clamp_min(0.0)))


def evbmf_rank(y: torch.Tensor) -> int:
    """Rank of the analytic empirical variational Bayesian matrix factorisation (Nakajima, Sugiyama,
    Babacan, Tomioka, "Global analytic solution of fully-observed variational Bayesian matrix
    factorization", JMLR 2013), with the noise variance estimated by minimising the free energy.

    Robust where simple ports are not: any shape (the matrix is transposed so that L <= M), a 1 x M or
    all-zero matrix, and a noise-only matrix, for which it returns 1 (the smallest usable rank) instead
    of 0 or an index error. Computed in float64; the 1-D minimisation is a golden-section search over
    log sigma^2 inside the paper's bounds.
    """
    y = y.detach().to(torch.float64).cpu()
    if y.dim() != 2:
        raise ValueError(f"evbmf_rank expects a matrix, got shape {tuple(y.shape)}")
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = torch.linalg.svdvals(y)
    if L < 2 or float(s[0]) == 0.0:
        return 1
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    s2 = s * s
    total = float(s2.sum())
    # Bounds of sigma^2 (Nakajima et al. 2013, section 4): the largest H with enough noise components.
    h_ub = max(0, min(math.ceil(L / (1.0 + alpha)) - 1, L - 1))
    upper = total / (L * M)
    lower = max(float(s2[h_ub]) / (M * x_bar), float(s2[h_ub:].mean()) / M) if h_ub < L else upper * 1e-6
    lower = min(max(lower, upper * 1e-12), upper)

    def free_energy(log_sigma2: float) -> float:
        sigma2 = math.exp(log_sigma2)
        x = s2 / (M * sigma2)
        big = x > x_bar
        z1, z2 = x[big], x[~big]
        t1 = _tau(z1, alpha)
        value = float((z2 - torch.log(z2.clamp_min(1e-300))).sum())
        value += float((z1 - t1).sum() + torch.log((t1 + 1.0) / z1).sum() + alpha * torch.log(t1 / alpha + 1.0).sum())
        return value

    a, b = math.log(lower), math.log(upper)
    if b - a > 1e-12:
        g = (math.sqrt(5.0) - 1.0) / 2.0
        c, d = b - g * (b - a), a + g * (b - a)
        fc, fd = free_energy(c), free_energy(d)
        for _ in range(100):
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - g * (b - a)
                fc = free_energy(c)
            else:
                a, c, fc = c, d, fd
                d = a + g * (b - a)
                fd = free_energy(d)
        sigma2 = math.exp((a + b) / 2.0)
    else:
        sigma2 = upper
    threshold = math.sqrt(M * sigma2 * x_bar)
    return max(1, int((s > threshold).sum()))


def energy_rank(y: torch.Tensor, energy: float) -> int:
    """The smallest r whose r leading singular values of the matrix keep ``energy`` of its squared norm."""
    s2 = torch.linalg.svdvals(y.detach().to(torch.float64).cpu()).square()
    total = float(s2.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(s2, 0) / total
    return max(1, min(int((kept < energy - 1e-12).sum()) + 1, len(s2)))


def data_rank(spec: str, weight: torch.Tensor, method: str, groups: int = 1):
    """The rank a string ``spec`` ("evbmf", "energy=0.9") gives for the kernel ``weight``
    [C_out, C_in, kh, kw] (or a linear layer's [out, in]): from its mode-0 and mode-1 unfoldings, a pair
    (R_out, R_in) for Tucker and their maximum for CP; SVD: from the kernel as a matrix. A grouped
    kernel: the largest of its groups' ranks, for every group."""
    if spec == "evbmf":
        fn = evbmf_rank
    elif spec.startswith("energy="):
        try:
            energy = float(spec.split("=", 1)[1])
        except ValueError:
            energy = -1.0
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"rank {spec!r}: the energy must be a fraction in (0, 1]")
        fn = lambda m: energy_rank(m, energy)  # noqa: E731
    else:
        raise ValueError(f"rank must be an int, a pair, a fraction, 'evbmf' or 'energy=F', got {spec!r}")
    w = weight.detach()
    if w.dim() == 2:
        w = w[:, :, None, None]
    blocks = w.chunk(groups, 0) if groups > 1 else [w]
    r_out = max(fn(b.reshape(b.shape[0], -1)) for b in blocks)
    if method == "svd":
        return groups * r_out
    r_in = max(fn(b.transpose(0, 1).reshape(b.shape[1], -1)) for b in blocks)
    return (groups * r_out, groups * r_in) if method == "tucker" else groups * max(r_out, r_in)
