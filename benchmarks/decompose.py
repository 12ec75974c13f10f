"""Time tdconv's decompositions of ResNet-18 conv kernels against TensorLy 0.10.

Layer sets (random-init ``torchvision.models.resnet18(weights=None, num_classes=10)``, seeded):

* ``seed``: the 8 ``conv2`` layers of the BasicBlocks (``layerX[i].conv2``);
* ``all``:  every ``Conv2d`` of the network (stem, block convs and 1x1 downsample convs).

Methods, per layer ``w`` of shape ``[C_out, C_in, kh, kw]``:

* ``cp``:    CP-ALS of ``w.reshape(C_out, C_in, kh*kw)`` at rank ``C_out // 2``. Both libraries start
  from the same factors (tdconv's SVD initialisation, computed once, weights all ones); the
  initialisation is not timed. TensorLy: ``parafac(..., tol=0, linesearch=False,
  normalize_factors=False)``.
* ``hosvd``: Tucker-2 on modes (0, 1), ranks ``(C_out // 2, C_in // 2)`` (at least 1).
  TensorLy: ``partial_tucker(..., init="svd", n_iter_max=0)``, which in 0.10 returns the SVD
  initialisation itself, i.e. the truncated HOSVD.
* ``hooi``:  Tucker-2 as above, refined by HOOI; both start from their own HOSVD (the same
  subspaces) and the timing includes it.

Every run uses ``tol=0`` so all iterations run. Times are the median of ``--repeats`` runs
(``time.perf_counter``, with ``torch.cuda.synchronize`` around each run on CUDA), after one untimed
warm-up call per method on the smallest layer. Relative errors ``||X - X^|| / ||X||`` are computed
here, in float64, from each library's reconstruction.

TensorLy is slow on a CPU (minutes for 100 iterations of the seed set), so ``--tensorly-iters K``
lets it run ``K < --iters`` iterations. Its time is then extrapolated to ``--iters`` (CP: ``t_K *
N / K``; HOOI: ``t_0 + (t_K - t_0) * N / K`` with ``t_0`` its HOSVD setup time, measured) and flagged
``tl_extrapolated`` / ``*``; the errors of both libraries are then compared after K iterations (a
separate, untimed tdconv run), and tdconv's error after N iterations is kept in the JSON.

Finally ``tdconv.decompose_batch`` decomposes the whole layer set by CP in one call (per-layer ranks,
``init="svd"``, seed 0; its time includes the initialisation). This is the row the GPU target "all
conv layers of resnet18, CP rank C/2, 100 iterations, under 1 s" is judged on.

Usage (from the repository root)::

    python benchmarks/decompose.py --quick                 # seed layers, 10 iters, TensorLy 2 iters
    python benchmarks/decompose.py --device cuda           # both sets, 100 iters, on the GPU
    python benchmarks/decompose.py --layers all --methods cp --tensorly-iters 5
    python benchmarks/decompose.py --no-tensorly --json out.json

Results (environment, rows, totals, batched rows) go to ``--json`` (default
``bench_results/decompose-<device>.json``). Exit code 2: CUDA requested but unavailable, or bad
arguments.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from common import (SEED_LAYER, environment, print_environment, print_table, resnet18_kernels, tdconv, timed,
                    write_json)

METHODS = ("cp", "hosvd", "hooi")


# ---------------------------------------------------------------------------------------------- setup
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time tdconv's CP / HOSVD / HOOI against TensorLy on ResNet-18 "
                                            "conv kernels.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--layers", choices=("seed", "all", "both"), default=None,
                   help="layer set(s) (default both; --quick forces seed)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of cp,hosvd,hooi")
    p.add_argument("--iters", type=int, default=None, help="CP / HOOI iterations (default 100, --quick 10)")
    p.add_argument("--tensorly-iters", type=int, default=None,
                   help="TensorLy iterations; time extrapolated to --iters (default --iters, --quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3, --quick 1)")
    p.add_argument("--quick", action="store_true", help="seed layers, 10 iterations, TensorLy 2, 1 repeat")
    p.add_argument("--no-tensorly", action="store_true", help="time tdconv only")
    p.add_argument("--json", type=Path, default=None, help="output file (default bench_results/decompose-<device>.json)")
    args = p.parse_args(argv)

    if args.quick:
        if args.layers not in (None, "seed"):
            print(f"note: --quick uses the seed layers only (ignoring --layers {args.layers})")
        args.layers = "seed"
    args.layers = args.layers or "both"
    args.iters = args.iters if args.iters is not None else (10 if args.quick else 100)
    args.tensorly_iters = (args.tensorly_iters if args.tensorly_iters is not None
                           else min(2, args.iters) if args.quick else args.iters)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    if args.iters < 1 or args.repeats < 1:
        p.error("--iters and --repeats must be >= 1")
    if not 1 <= args.tensorly_iters <= args.iters:
        p.error("--tensorly-iters must be between 1 and --iters")
    if args.json is None:
        args.json = Path("bench_results") / f"decompose-{args.device}.json"
    return args


def load_tensorly():
    """``(namespace, None)`` or ``(None, reason)``."""
    try:
        import tensorly as tl
        from tensorly.cp_tensor import CPTensor
        from tensorly.decomposition import parafac, partial_tucker
        from tensorly.tenalg import multi_mode_dot
        tl.set_backend("pytorch")
    except Exception as exc:  # not installed, or a broken install
        return None, f"{type(exc).__name__}: {exc}"
    return argparse.Namespace(tl=tl, CPTensor=CPTensor, parafac=parafac, partial_tucker=partial_tucker,
                              multi_mode_dot=multi_mode_dot, version=tl.__version__), None


# ---------------------------------------------------------------------------------------------- measuring
def rel_error(x: torch.Tensor, approx: torch.Tensor) -> float:
    x = x.double()
    return float(torch.linalg.vector_norm(x - approx.double()) / torch.linalg.vector_norm(x))


def cp_rank(w) -> int:
    return max(1, w.shape[0] // 2)


def tucker_ranks(w) -> tuple:
    return max(1, w.shape[0] // 2), max(1, w.shape[1] // 2)


class Bench:
    """Runs one (layer, method) comparison; holds the settings shared by all of them."""

    def __init__(self, args, tlns):
        self.device, self.tlns = args.device, tlns
        self.N, self.K, self.repeats = args.iters, args.tensorly_iters, args.repeats

    def _tdconv_row(self, td, x, N, repeats, rank) -> dict:
        """Time ``td(N)`` and start a row with its time and errors."""
        row = {"rank": rank}
        row["tdconv_s"], res = timed(lambda: td(N), self.device, repeats)
        row["tdconv_rel_error_full"] = rel_error(x, res.to_tensor())
        row["tdconv_internal_rel_error"] = res.rel_error
        return row

    # -- one function per method: returns the measured fields of a row
    def cp(self, w, N=None, K=None, repeats=None):
        N, K, repeats = N or self.N, K or self.K, repeats or self.repeats
        x = w.reshape(w.shape[0], w.shape[1], -1)
        rank = cp_rank(w)
        start = tdconv.initialize_cp(x, rank, init="svd", seed=0)  # weights all ones
        ones, factors = start.weights, list(start.factors)

        def td(n):
            return tdconv.cp_als(x, rank, n_iter_max=n, tol=0.0, init=(ones, factors))

        row = self._tdconv_row(td, x, N, repeats, rank)
        if self.tlns:
            T = self.tlns

            def tl_run(k):
                init = T.CPTensor((ones.clone(), [f.clone() for f in factors]))
                return T.parafac(x, rank, n_iter_max=k, init=init, tol=0, linesearch=False,
                                 normalize_factors=False)

            t_k, tl_res = timed(lambda: tl_run(K), self.device, repeats)
            row.update(tl_measured_s=t_k, tensorly_s=t_k * N / K,
                       tensorly_rel_error=rel_error(x, T.tl.cp_to_tensor(tl_res)))
            row["tdconv_rel_error"] = (row["tdconv_rel_error_full"] if K == N
                                       else rel_error(x, td(K).to_tensor()))
        else:
            row["tdconv_rel_error"] = row["tdconv_rel_error_full"]
        return row

    def _tucker(self, w, hooi: bool, N, K, repeats):
        ranks, modes = tucker_ranks(w), (0, 1)
        if hooi:
            def td(n):
                return tdconv.tucker_hooi(w, ranks, modes=modes, n_iter_max=n, tol=0.0)
        else:
            def td(n):
                return tdconv.tucker_hosvd(w, ranks, modes=modes)
            K = N = 0

        row = self._tdconv_row(td, w, N, repeats, ranks)
        if self.tlns:
            T = self.tlns

            def tl_run(k):
                (core, factors), _ = T.partial_tucker(w, rank=ranks, modes=list(modes), n_iter_max=k,
                                                      init="svd", tol=0)
                return core, factors

            t_k, (core, factors) = timed(lambda: tl_run(K), self.device, repeats)
            row["tl_measured_s"] = t_k
            row["tensorly_rel_error"] = rel_error(w, T.multi_mode_dot(core, factors, modes=list(modes)))
            if K == N:
                row["tensorly_s"] = t_k
                row["tdconv_rel_error"] = row["tdconv_rel_error_full"]
            else:  # the HOSVD setup is paid once: extrapolate the sweeps only
                t_0, _ = timed(lambda: tl_run(0), self.device, repeats)
                row["tl_setup_s"] = t_0
                row["tensorly_s"] = t_0 + max(t_k - t_0, 0.0) * N / K
                row["tdconv_rel_error"] = rel_error(w, td(K).to_tensor())
        else:
            row["tdconv_rel_error"] = row["tdconv_rel_error_full"]
        return row

    def hosvd(self, w, N=None, K=None, repeats=None):
        return self._tucker(w, False, N, K, repeats or self.repeats)

    def hooi(self, w, N=None, K=None, repeats=None):
        return self._tucker(w, True, N or self.N, K or self.K, repeats or self.repeats)

    def run(self, name, w, method) -> dict:
        iterative = method != "hosvd"
        row = {"layer": name, "shape": list(w.shape), "method": method,
               "iters": self.N if iterative else 0,
               "tl_iters": (self.K if iterative else 0) if self.tlns else None,
               "error_iters": (self.K if iterative else 0) if self.tlns else (self.N if iterative else 0)}
        row.update(getattr(self, method)(w))
        row["tl_extrapolated"] = bool(self.tlns) and iterative and self.K < self.N
        tl_s = row.get("tensorly_s")
        row["speedup"] = tl_s / row["tdconv_s"] if tl_s is not None and row["tdconv_s"] > 0 else None
        return row

    def warm_up(self, w, methods) -> None:
        for m in methods:
            getattr(self, m)(w, N=2, K=1, repeats=1)

    def batched_cp(self, layers) -> dict:
        xs = [w.reshape(w.shape[0], w.shape[1], -1) for _, w in layers]
        ranks = [cp_rank(w) for _, w in layers]
        t, res = timed(lambda: tdconv.decompose_batch(xs, "cp", ranks, n_iter_max=self.N, tol=0.0,
                                                      init="svd", seed=0), self.device, self.repeats)
        errs = [rel_error(x, r.to_tensor()) for x, r in zip(xs, res)]
        return {"method": "cp (decompose_batch)", "layers": len(xs), "iters": self.N,
                "groups": len({(tuple(x.shape), r) for x, r in zip(xs, ranks)}), "tdconv_s": t,
                "rel_errors": dict(zip([n for n, _ in layers], errs)),
                "mean_rel_error": statistics.fmean(errs), "max_rel_error": max(errs)}


# ---------------------------------------------------------------------------------------------- reporting
def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def rank_str(r) -> str:
    return "x".join(map(str, r)) if isinstance(r, (tuple, list)) else str(r)


def print_rows(title: str, rows: list) -> None:
    cols = ["layer", "shape", "method", "rank", "iters", "tdconv s", "tensorly s", "speed-up",
            "err@", "tdconv err", "tensorly err"]
    body = [[r["layer"], "x".join(map(str, r["shape"])), r["method"], rank_str(r["rank"]), str(r["iters"]),
             fmt(r["tdconv_s"], ".4f"),
             fmt(r.get("tensorly_s"), ".4f") + ("*" if r["tl_extrapolated"] else ""),
             fmt(r["speedup"], ".1f") + ("x" if r["speedup"] is not None else ""),
             str(r["error_iters"]), fmt(r["tdconv_rel_error"], ".5f"), fmt(r.get("tensorly_rel_error"), ".5f")]
            for r in rows]
    print(f"\n== {title} ==")
    print_table(cols, body, right=range(3, len(cols)))


def totals(rows: list, methods: list) -> dict:
    out = {}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        td = sum(r["tdconv_s"] for r in rs)
        tl = sum(r["tensorly_s"] for r in rs) if all(r.get("tensorly_s") is not None for r in rs) else None
        out[m] = {"layers": len(rs), "tdconv_s": td, "tensorly_s": tl,
                  "tl_extrapolated": any(r["tl_extrapolated"] for r in rs),
                  "speedup": tl / td if tl is not None and td > 0 else None}
    return out


def print_totals(tot: dict, batched: dict | None, target_applies: bool) -> None:
    for m, t in tot.items():
        star = "*" if t["tl_extrapolated"] else ""
        sp = f"{t['speedup']:.1f}x" if t["speedup"] is not None else "-"
        print(f"total {m:<5} ({t['layers']} layers): tdconv {t['tdconv_s']:.4f} s   tensorly "
              f"{fmt(t['tensorly_s'], '.4f')}{star} s   speed-up {sp}")
    if batched:
        b = batched
        line = (f"batched cp   ({b['layers']} layers, {b['groups']} groups, {b['iters']} iters, svd init "
                f"included): tdconv.decompose_batch {b['tdconv_s']:.4f} s")
        if "cp" in tot and tot["cp"]["tensorly_s"] is not None:
            star = "*" if tot["cp"]["tl_extrapolated"] else ""
            line += f"   vs tensorly {tot['cp']['tensorly_s']:.4f}{star} s: {tot['cp']['tensorly_s'] / b['tdconv_s']:.1f}x"
        print(line)
        extra = f"             rel error mean {b['mean_rel_error']:.5f}, max {b['max_rel_error']:.5f}"
        if b.get("max_abs_diff_vs_single") is not None:
            extra += f"; max |batched - per-layer| {b['max_abs_diff_vs_single']:.2e}"
        print(extra)
        if target_applies:
            print(f"             GPU target (all convs, CP, 100 iters, < 1 s): "
                  f"{'met' if b['tdconv_s'] < 1.0 else 'NOT met'}")


def print_legend(args, tlns) -> None:
    print("\nlegend: times are medians of", args.repeats, "run(s) in seconds; speed-up = tensorly / tdconv;")
    print("        errors are ||X - X^|| / ||X|| after err@ iterations (0 = HOSVD), computed in float64.")
    print("        cp: same SVD init for both (not timed); hosvd: TensorLy partial_tucker(n_iter_max=0);")
    print("        hooi: both start from their own HOSVD, included in the time.")
    if tlns and args.tensorly_iters < args.iters:
        print(f"        * TensorLy ran {args.tensorly_iters} iteration(s), time extrapolated to {args.iters} "
              f"(hooi: HOSVD setup counted once); errors compared at {args.tensorly_iters} iteration(s).")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but torch sees no CUDA device "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    if tdconv.unavailable_reasons(args.device):
        print("warning: tdconv's compiled ops cannot run on", args.device, "-",
              "; ".join(tdconv.unavailable_reasons(args.device)), "(timing the pure-PyTorch fallback)")

    tlns = None
    if not args.no_tensorly:
        tlns, reason = load_tensorly()
        if tlns is None:
            print(f"note: TensorLy is not importable ({reason}); timing tdconv only")

    env = environment(args.device, tensorly=tlns.version if tlns else None, dtype=args.dtype)
    print_environment(env, ["tensorly", "dtype"])
    print(f"{'settings':<20} iters {args.iters}, tensorly iters {args.tensorly_iters if tlns else '-'}, "
          f"repeats {args.repeats}, methods {','.join(args.methods)}")

    dtype = getattr(torch, args.dtype)
    all_layers = resnet18_kernels("all", args.device, dtype)
    sets = {"seed": [lw for lw in all_layers if SEED_LAYER.match(lw[0])], "all": all_layers}
    names = ["seed", "all"] if args.layers == "both" else [args.layers]

    bench = Bench(args, tlns)
    smallest = min((w for n in names for _, w in sets[n]), key=lambda w: w.numel())
    bench.warm_up(smallest, args.methods)

    cache: dict = {}  # (layer, method) -> row; the seed set is a subset of the full one
    results = {"env": env, "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "sets": {}}
    t_start = time.perf_counter()
    for set_name in names:
        layers = sets[set_name]
        rows = []
        for name, w in layers:
            for m in args.methods:
                if (name, m) not in cache:
                    cache[name, m] = bench.run(name, w, m)
                rows.append(cache[name, m])
        batched = bench.batched_cp(layers) if "cp" in args.methods else None
        if batched:
            single = {r["layer"]: r["tdconv_rel_error_full"] for r in rows if r["method"] == "cp"}
            batched["max_abs_diff_vs_single"] = max(abs(e - single[n]) for n, e in batched["rel_errors"].items())
        tot = totals(rows, args.methods)
        print_rows(f"{set_name} layers ({len(layers)})", rows)
        print_totals(tot, batched, set_name == "all" and args.device == "cuda" and args.iters == 100)
        results["sets"][set_name] = {"layers": [n for n, _ in layers], "rows": rows, "totals": tot,
                                     "batched": batched}
    print_legend(args, tlns)
    results["wall_s"] = time.perf_counter() - t_start

    write_json(args.json, results)
    print(f"\nresults written to {args.json.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
