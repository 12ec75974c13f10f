"""Is the factorised ResNet18 actually faster? Latency of dense vs CP / Tucker ResNet18, fused vs unfused.

Runs with no data and no downloads (random weights; latency does not depend on them), on the CPU or
a GPU. Two parts:

1. Per layer: every distinct 3x3 conv shape of resnet18 at the chosen input resolution, as a dense
   ``nn.Conv2d``, and at rank C/2 as the unfused CP and Tucker-2 chains and as the fused ops
   (``torch.ops.tdconv.cp_conv2d``, ``tucker_conv2d``); median latency, speed-up over the chain and
   over dense, achieved GFLOP/s.
2. Whole models: dense torchvision resnet18 (10 classes) against its CP and Tucker versions, for the
   seed's configuration (``conv2`` of each BasicBlock at rank C/2) and for every 3x3 conv but the stem
   at rank C/2, each with the fused ops and with the unfused chains; input 3x32x32 with the ImageNet
   stem (the seed's model), 3x32x32 with the CIFAR stem (3x3 stride-1 stem, no max-pool) and
   3x224x224; median latency, ratio to dense measured in the same run, parameters and MACs (ptflops,
   ``backend="pytorch"``, functional calls not counted, as the seed counted them). The ``auto`` rows
   are what a user gets by default: per layer and input shape, the faster of the fused op and the
   chain, timed once (``tdconv.set_autotune``). The ``floor`` rows
   are the same models with the factorised layers replaced by free stand-ins: the latency of
   everything else, which bounds what any kernel for the factorised layers can reach.

The candidates of one table row are timed in interleaved rounds (7 rounds, median), so that the slow
phases of a noisy machine hit all of them alike.

Usage::

    python benchmarks/latency.py --quick          # 3x32x32 ImageNet stem, batch 32, seed configuration
    python benchmarks/latency.py --device cpu     # everything (minutes on 2 cores)
    python benchmarks/latency.py --device cuda

Every model and input is in channels_last memory format (``--no-channels-last`` to turn it off).
Results go to ``--json`` (default ``bench_results/latency-<device>.json``).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from common import environment, median_times, print_environment, print_table, resnet18, tdconv, write_json
from tdconv.compress import count_complexity

INPUTS = {"imagenet32": ("imagenet", 32), "cifar32": ("cifar", 32), "imagenet224": ("imagenet", 224)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="imagenet32, batch 32, seed configuration only")
    p.add_argument("--inputs", default=None, help="comma list of imagenet32,cifar32,imagenet224")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,32,128; +256 on GPU)")
    p.add_argument("--configs", default=None, help="comma list of seed,all3x3 (default both)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed runs per measurement")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda requested but torch sees no CUDA device\n")
    args.inputs = (args.inputs or ("imagenet32" if args.quick else "imagenet32,cifar32,imagenet224")).split(",")
    args.batches = [int(b) for b in (args.batches or ("32" if args.quick else "1,32,128" + (",256" if gpu else "")))
                    .split(",")]
    args.configs = (args.configs or ("seed" if args.quick else "seed,all3x3")).split(",")
    args.min_time = args.min_time or (0.3 if args.quick else 1.0)
    args.json = args.json or Path(f"bench_results/latency-{args.device}.json")
    return args


ROUNDS = 7


def median_latencies(fns: dict, device, min_time: float) -> dict:
    """Median seconds per call of each function, over 7 rounds that each time every function in turn
    (interleaved, so that a slow phase of a noisy machine hits all candidates alike), after 3 warm-up
    calls; each timed call repeats a function often enough that its rounds take about ``min_time``."""
    return median_times(fns, rounds=ROUNDS, warmup=3, min_time=min_time, device=device)


class _Free(nn.Module):
    """Stands in for a factorised layer at no cost (returns a preallocated output of its shape): the
    model's latency with it is the floor that no kernel for the factorised layers can go below."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def floor_model(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` with every FactorizedConv2d replaced by a free stand-in of the same output."""
    model = copy.deepcopy(model)
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=n: outs.__setitem__(name, out))
             for n, m in model.named_modules() if isinstance(m, tdconv.FactorizedConv2d)]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    for name, out in outs.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _Free(out))
    return model


def factorise(model: nn.Module, config: str, method: str) -> nn.Module:
    """``model`` with the convs of a configuration factorised at rank C/2: "seed" (conv2 of every
    BasicBlock) or "all3x3" (tdconv.compress's default: every 3x3 conv but the stem)."""
    # Latency does not depend on the fit: a few sweeps keep the set-up short.
    layers = "seed" if config == "seed" else None
    return tdconv.compress(model, method, 0.5, layers=layers, n_iter_max=3, seed=0, progress=False)[0]


def set_implementation(model: nn.Module, impl: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, tdconv.FactorizedConv2d):
            m.implementation = impl
    return model


def layer_rows(args, device, res, stem, cl):
    model = resnet18(stem).eval()
    x = torch.randn(1, 3, res, res)
    shapes = {}

    def record(name):
        def h(mod, inp, out):
            key = (mod.in_channels, mod.out_channels, mod.stride, tuple(inp[0].shape[2:]))
            shapes.setdefault(key, (name, mod))
        return h
    hooks = [mod.register_forward_hook(record(n)) for n, mod in model.named_modules()
             if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rows = []
    for (cin, cout, stride, hw), (name, conv) in shapes.items():
        conv = conv.to(device)
        layers = {"cp": tdconv.FactorizedConv2d.from_conv(conv, method="cp", rank=0.5, n_iter_max=3, seed=0),
                  "tucker": tdconv.FactorizedConv2d.from_conv(conv, method="tucker", rank=0.5, n_iter_max=3)}
        for batch in args.batches:
            xi = torch.randn(batch, cin, *hw, device=device)
            if cl:
                xi = xi.to(memory_format=torch.channels_last)
            row = {"layer": name, "shape": f"{cout}x{cin}x3x3/s{stride[0]}", "input": f"{hw[0]}x{hw[1]}",
                   "batch": batch}
            fns = {"dense": lambda: conv(xi)}
            for method, layer in layers.items():
                unfused = set_implementation(copy.deepcopy(layer), "unfused")
                fns[f"{method}_unfused"] = lambda m=unfused: m(xi)
                layer.implementation = "fused"  # also a kernel not yet validated on this device
                reasons = layer.fused_unsupported_reasons(xi)
                if reasons:
                    row[f"{method}_fused_reasons"] = reasons
                else:
                    fused = set_implementation(layer, "fused")
                    fns[f"{method}_fused"] = lambda m=fused: m(xi)
            with torch.inference_mode():
                t = median_latencies(fns, device, args.min_time / 2)
            row.update({f"{k}_ms": v * 1e3 for k, v in t.items()})
            for method, layer in layers.items():
                if f"{method}_fused" in t:
                    row[f"{method}_fused_vs_unfused"] = t[f"{method}_unfused"] / t[f"{method}_fused"]
                    row[f"{method}_fused_vs_dense"] = t["dense"] / t[f"{method}_fused"]
                    row[f"{method}_fused_gflops"] = 2 * layer.macs(hw) * batch / t[f"{method}_fused"] / 1e9
            rows.append(row)
    return rows


def fused_or_auto(model: nn.Module, x: torch.Tensor) -> str:
    """"fused" when every factorised layer can run its fused op on inputs like ``x`` (kernels not yet
    validated on this device included: measuring them is the point), else "auto"."""
    layers = [m for m in model.modules() if isinstance(m, tdconv.FactorizedConv2d)]
    probe = [copy.copy(m) for m in layers]
    for m in probe:
        m.implementation = "fused"
    return "fused" if all(not m.fused_unsupported_reasons(x) for m in probe) else "auto"


def model_rows(args, device, input_name, cl):
    stem, res = INPUTS[input_name]
    dense = resnet18(stem).eval()
    fmt = torch.channels_last if cl else torch.contiguous_format
    variants = {"dense": dense}
    for config in args.configs:
        for method in ("cp", "tucker"):
            variants[f"{method}-{config}"] = factorise(dense, config, method).eval()
    info = {k: count_complexity(m, (3, res, res)) for k, m in variants.items()}
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, res, res, device=device).to(memory_format=fmt)
        fns, base_of = {}, {}
        for k, m in variants.items():
            m = m.to(device=device, memory_format=fmt)
            if k == "dense":
                fns[k], base_of[k] = (lambda m=m: m(x)), k
                continue
            for impl in ("fused", "unfused", "auto"):
                mi = set_implementation(copy.deepcopy(m), fused_or_auto(m, x) if impl == "fused" else impl)
                fns[f"{k}/{impl}"], base_of[f"{k}/{impl}"] = (lambda m=mi: m(x)), k
            free = floor_model(m, x)
            fns[f"{k}/floor"], base_of[f"{k}/floor"] = (lambda m=free: m(x)), k
        with torch.inference_mode():
            times = median_latencies(fns, device, args.min_time)
        for label, t in times.items():
            macs, params = info[base_of[label]]
            rows.append({"input": input_name, "batch": batch, "model": label, "ms": t * 1e3,
                         "ratio_to_dense": t / times["dense"], "mmacs": macs / 1e6,
                         "mparams": params / 1e6})
    return rows


def print_rows(rows: list, cols: list) -> None:
    print_table(cols, [[r.get(c) for c in cols] for r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cl = not args.no_channels_last
    env = environment(device, channels_last=cl)
    print_environment(env, ["channels_last"])
    result = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "layers": [], "models": []}
    for input_name in args.inputs:
        stem, res = INPUTS[input_name]
        print(f"\n== per layer: distinct 3x3 convs of resnet18 at {input_name}, rank C/2 ==")
        rows = layer_rows(args, device, res, stem, cl)
        print_rows(rows, ["layer", "shape", "input", "batch", "dense_ms", "cp_unfused_ms", "cp_fused_ms",
                           "cp_fused_vs_unfused", "cp_fused_vs_dense", "cp_fused_gflops", "tucker_unfused_ms",
                           "tucker_fused_ms", "tucker_fused_vs_unfused", "tucker_fused_vs_dense"])
        result["layers"] += [dict(r, input_set=input_name) for r in rows]
        print(f"\n== whole models at {input_name} (ratio to dense measured in the same run) ==")
        rows = model_rows(args, device, input_name, cl)
        print_rows(rows, ["input", "batch", "model", "ms", "ratio_to_dense", "mmacs", "mparams"])
        result["models"] += rows
    write_json(args.json, result)
    print(f"\nmedians of {ROUNDS} rounds; results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
