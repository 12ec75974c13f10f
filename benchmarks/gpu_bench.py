"""The GPU figures of tdconv in one script, each row appended to a JSON-lines file as soon as it is
measured (a run cut short keeps every finished row):

- ``decompose``: every conv of resnet18 (20 kernels), CP at rank C_out / 2, a fixed number of sweeps,
  all in one ``decompose_batch`` call: eager, with the fused small solve, with CUDA graphs, with both;
  TensorLy's ``parafac`` on the same device beside it (layer by layer, as TensorLy runs); then each
  shape group alone with both engine paths on, largest rank first (where the time goes).
- ``layers``: each seed layer shape (resnet18's conv2 layers at 224 x 224) at batch 256: dense cuDNN,
  the unfused CP / Tucker chain (cuDNN) and the fused op, float32 and bfloat16.
- ``models``: the seed's CP and Tucker resnet18 (ImageNet stem, 3 x 32 x 32 inputs, as the seed's
  experiment) against the dense one, batch 256, eager and (with ``--compile``) under ``torch.compile``.

    python benchmarks/gpu_bench.py SECTION --out FILE.jsonl [--device cuda] [--tiny]

``--tiny`` shrinks every shape and count so that the whole script runs on a CPU in seconds (the dry
run of benchmarks/gpu_check.sh); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

import tdconv
import tdconv.info
from tdconv.utils import describe_environment, median_times

SEED_LAYER = re.compile(r"^layer\d\.\d\.conv2$")


STATS = ("graph_captures", "graph_capture_failures", "graph_replays", "small_solves", "fused_conv_launches",
         "fused_conv_fallbacks")


def engine_stats() -> dict:
    """What the CUDA paths did since load (tdconv::_cuda_engine_stats): tells a path that ran from one
    that fell back."""
    return dict(zip(STATS, torch.ops.tdconv._cuda_engine_stats()))


def engine_stats_since(before: dict) -> dict:
    """The decomposition engine's counters (graphs, small solves) since ``before``."""
    return {k: v - before[k] for k, v in engine_stats().items() if k.startswith(("graph", "small"))}


class Rows:
    """Appends one JSON object per line and flushes it, so that a killed run keeps its rows. With a
    deadline (seconds from the start), ``time_left()`` says whether another row should be started."""

    def __init__(self, path: Path, section: str, device: torch.device, deadline: float | None = None):
        self.path, self.section = path, section
        self.t0, self.deadline = time.perf_counter(), deadline
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")
        self.add({"kind": "environment", **describe_environment(device), **tdconv.info.collect()})

    def time_left(self, need: float = 0.0) -> bool:
        """Whether a row that takes about ``need`` seconds can still start."""
        if self.deadline is not None and time.perf_counter() - self.t0 + need > self.deadline:
            self.add({"kind": "deadline", "note": f"stopped starting rows after {self.deadline:.0f} s"})
            self.deadline = None  # noted once; every later call answers False
            self.stopped = True
        return not getattr(self, "stopped", False)

    def add(self, row: dict) -> None:
        row = {"section": self.section, **row}
        self.f.write(json.dumps(row, default=str) + "\n")
        self.f.flush()
        print(" ".join(f"{k}={v}" for k, v in row.items() if k not in ("section",) and not isinstance(v, dict))[:400],
              flush=True)


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def resnet18(device, dtype=torch.float32):
    from tdconv.apps.models import build_model

    torch.manual_seed(0)
    return build_model("resnet18", 10, stem="imagenet").to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- decompose
def decompose(args, rows: Rows, device) -> None:
    weights = [m.weight.detach() for m in resnet18(device).modules() if isinstance(m, nn.Conv2d)]
    if args.tiny:
        weights = [w[:8, :8] for w in weights[:4]]
    iters = 3 if args.tiny else args.iters
    xs = [w.reshape(w.shape[0], w.shape[1], -1) for w in weights]
    ranks = [max(1, w.shape[0] // 2) for w in weights]

    def run():
        return tdconv.decompose_batch(xs, "cp", ranks, n_iter_max=iters, tol=0.0, seed=0)

    base = None
    whole = {}  # variant -> seconds
    for name, flags in [("eager", {}), ("small_solve", {"TDCONV_CUDA_SMALL_SOLVE": "1"}),
                        ("graphs", {"TDCONV_CUDA_GRAPHS": "1"}),
                        ("graphs+small_solve", {"TDCONV_CUDA_GRAPHS": "1", "TDCONV_CUDA_SMALL_SOLVE": "1"})]:
        if not rows.time_left():
            return
        with env(**flags):
            try:
                once(run, device)  # warm-up (allocator, cuBLAS handles)
                before = engine_stats()
                times, out = [], None
                for _ in range(args.repeats):
                    sync(device)
                    t = time.perf_counter()
                    out = run()
                    sync(device)
                    times.append(time.perf_counter() - t)
                seconds = min(times)
                stats = engine_stats_since(before)
                err = [float(c.rel_error) for c in out]
            except Exception as exc:  # a variant that fails is a finding, not the end of the run
                rows.add({"kind": "decompose", "variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
        if base is None:
            base = err
        whole[name] = seconds
        # The fused small solve takes ranks up to 64 (here the layers of 64 and 128 output channels); the
        # graphs take every shape group, with ATen's Cholesky and triangular solves inside for the larger
        # ranks. `stats` says what ran (a capture that failed is counted and ran eager).
        rows.add({"kind": "decompose", "variant": name, "layers": len(xs), "sweeps": iters, "seconds": seconds,
                  "layers_with_rank_le_64": sum(r <= 64 for r in ranks), "stats": stats,
                  "mean_rel_error": sum(err) / len(err),
                  "max_error_change_vs_eager": max(abs(a - b) for a, b in zip(err, base))})
    decompose_tensorly(xs, ranks, iters, rows, device, args)
    decompose_groups(xs, ranks, iters, rows, device, whole.get("graphs+small_solve"))


def decompose_tensorly(xs, ranks, iters, rows: Rows, device, args) -> None:
    """TensorLy's parafac on the same device, layer by layer (as TensorLy runs), fewer sweeps scaled."""
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac
    except ImportError as exc:
        rows.add({"kind": "decompose", "variant": "tensorly", "error": f"not installed: {exc}"})
        return
    tl.set_backend("pytorch")
    tl_iters = 2 if args.tiny else args.tensorly_iters
    n = len(xs)
    if not rows.time_left():
        return

    def run_tl():
        for x, r in zip(xs[:n], ranks[:n]):
            parafac(x, r, n_iter_max=tl_iters, init="svd", tol=0, random_state=0)

    try:
        once(lambda: parafac(xs[0], ranks[0], n_iter_max=1, init="svd", tol=0), device)
        seconds = once(run_tl, device)
        rows.add({"kind": "decompose", "variant": "tensorly", "layers": n, "sweeps": tl_iters, "seconds": seconds,
                  "seconds_scaled_to_sweeps": seconds * iters / tl_iters})
    except Exception as exc:
        rows.add({"kind": "decompose", "variant": "tensorly", "error": f"{type(exc).__name__}: {exc}"[:300]})


def decompose_groups(xs, ranks, iters, rows: Rows, device, whole_seconds: float | None) -> None:
    """Where the whole-network time goes: each shape group (equal shape and rank) decomposed alone, with
    both engine paths on, one timed run after a warm-up. In the whole-network call the groups run
    concurrently (a host thread and a stream each), so these times are each group's own critical path
    and do not add up to it."""
    groups: dict[tuple, list[int]] = {}
    for i, (x, r) in enumerate(zip(xs, ranks)):
        groups.setdefault((tuple(x.shape), r), []).append(i)
    for (shape, rank), members in sorted(groups.items(), key=lambda g: -g[0][1]):
        # About twice (warm-up, timed run) this group's share of the whole network's elements and rank.
        share = sum(xs[i].numel() * rank for i in members) / sum(x.numel() * r for x, r in zip(xs, ranks))
        if not rows.time_left(need=2 * share * whole_seconds if whole_seconds else 0.0):
            return
        group = [xs[i] for i in members]
        row = {"kind": "decompose_group", "variant": "graphs+small_solve", "shape": shape, "rank": rank,
               "members": len(group)}
        with env(TDCONV_CUDA_GRAPHS="1", TDCONV_CUDA_SMALL_SOLVE="1"):
            try:
                run = lambda: tdconv.decompose_batch(group, "cp", rank, n_iter_max=iters, tol=0.0, seed=0)  # noqa: E731
                once(run, device)
                before = engine_stats()
                seconds = once(run, device)
                stats = engine_stats_since(before)
            except Exception as exc:
                rows.add({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
        rows.add({**row, "sweeps": iters, "seconds": seconds, "stats": stats})


# ---------------------------------------------------------------------------------------------- layers
def layers(args, rows: Rows, device) -> None:
    shapes = [(64, 56), (128, 28), (256, 14), (512, 7)]
    batch = 2 if args.tiny else args.batch
    if args.tiny:
        shapes = [(8, 6)]
    for dtype in (torch.float32, torch.bfloat16):
        for c, hw in shapes:
            x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
            dense = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device, dtype).eval()
            for method, rank in (("cp", c // 2), ("tucker", (c // 2, c // 2))):
                if not rows.time_left():
                    return
                before = engine_stats()["fused_conv_launches"]
                fused = tdconv.FactorizedConv2d.from_conv(dense, method, rank, implementation="fused", n_iter_max=2,
                                                          seed=0).to(device, dtype).eval()
                chain = copy.deepcopy(fused)
                chain.implementation = "unfused"
                with torch.no_grad():
                    err = float((fused(x).float() - chain(x).float()).norm() / chain(x).float().norm())
                    t = median_times({"dense": lambda: dense(x), "chain": lambda: chain(x), "fused": lambda: fused(x)},
                                     rounds=args.rounds, warmup=3, device=device)
                rows.add({"kind": "layer", "dtype": str(dtype).replace("torch.", ""), "channels": c, "hw": hw,
                          "batch": batch, "method": method, "dense_ms": t["dense"] * 1e3,
                          "chain_ms": t["chain"] * 1e3, "fused_ms": t["fused"] * 1e3,
                          "fused_speedup_vs_chain": t["chain"] / t["fused"],
                          "fused_speedup_vs_dense": t["dense"] / t["fused"], "fused_vs_chain_rel_error": err,
                          "fused_kernel_launched": engine_stats()["fused_conv_launches"] > before})


# ---------------------------------------------------------------------------------------------- models
def models(args, rows: Rows, device) -> None:
    batch = 2 if args.tiny else args.batch
    size = 32
    x = torch.randn(batch, 3, size, size, device=device)
    dense = resnet18(device).eval()
    variants = {"dense": dense}
    for method in ("cp", "tucker"):
        for impl in ("fused", "auto"):
            m = tdconv.compress(copy.deepcopy(dense), method, 0.5, layers="seed", n_iter_max=2, seed=0,
                                progress=False, input_size=(3, size, size))[0].eval()
            for mod in m.modules():
                if isinstance(mod, tdconv.FactorizedConv2d):
                    mod.implementation = impl
            variants[f"{method}-{impl}"] = m
    # Each variant is timed against dense in its own interleaved pair, and its row written at once: a
    # stage cut short by torch.compile's compile times keeps the rows it finished.
    for mode in ["eager"] + (["compile"] if args.compile else []):
        # Under torch.compile the explicit fused op only (auto is the chain until the kernels are validated).
        names = [n for n in variants if n != "dense" and (mode == "eager" or n.endswith("-fused"))]
        fns = {name: (torch.compile(variants[name]) if mode == "compile" else variants[name])
               for name in ["dense", *names]}
        for name in names:
            # a compiled row compiles its model cold (tens of seconds on a GPU machine)
            if not rows.time_left(need=20.0 if mode == "compile" and not args.tiny else 0.0):
                return
            try:
                with torch.no_grad():
                    t = median_times({"dense": lambda: fns["dense"](x), name: lambda: fns[name](x)},
                                     rounds=args.rounds, warmup=3, device=device)
            except Exception as exc:
                rows.add({"kind": "model", "mode": mode, "model": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            rows.add({"kind": "model", "mode": mode, "model": name, "batch": batch, "input": f"3x{size}x{size}",
                      "ms": t[name] * 1e3, "dense_ms": t["dense"] * 1e3, "speedup_vs_dense": t["dense"] / t[name]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=("decompose", "layers", "models"))
    p.add_argument("--out", type=Path, required=True, help="JSON-lines file the rows are appended to")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU dry run (figures meaningless)")
    p.add_argument("--iters", type=int, default=100, help="CP sweeps (decompose)")
    p.add_argument("--tensorly-iters", type=int, default=20, help="TensorLy sweeps, its time also scaled to --iters")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="models: add torch.compile rows")
    stage = os.environ.get("STAGE_DEADLINE")  # set by benchmarks/gpu_check.sh: its stage's limit less a margin
    p.add_argument("--deadline", type=float, default=float(stage) if stage else None,
                   help="seconds after which no new row is started (the run then ends normally); default: "
                        "$STAGE_DEADLINE where set")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU (use --device cpu --tiny for a dry run)")
    rows = Rows(args.out, args.section, device, args.deadline)
    {"decompose": decompose, "layers": layers, "models": models}[args.section](args, rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
