"""Is the compressed ResNet18 actually faster, on the path users take? Dense vs CP vs Tucker latency.

Runs with no data and no downloads (random weights; latency does not depend on them), on the CPU or
a GPU. With no flags it answers the headline question in a few minutes:

    python benchmarks/latency.py           # headline (about a minute): 3x32x32 ImageNet stem (the seed's
                                           #   model), batch 1 and 32, seed configuration, NCHW, default settings
    python benchmarks/latency.py --full    # the sweep below (tens of minutes on 2 cores)
    python benchmarks/latency.py --quick   # CI: batch 8, a short timing, the headline rows only

The headline rows are what a user gets: ``torch.hub``-style NCHW model and inputs, ``model.eval()``,
``torch.inference_mode()``, ``tdconv.compress(model, method, 0.5, layers="seed")`` and nothing else
(``default``), then the same after ``tdconv.optimize_for_inference`` (``+opt``: BatchNorm folded, a
following ReLU fused, calls prepared). ``vs_dense`` is against the *faster* of dense NCHW and dense
channels_last, measured in the same interleaved rounds; ``vs_dense_opt`` against the faster of the
two dense models after ``optimize_for_inference`` (their BatchNorms folded into their convs), the
like-for-like comparison of an optimised compressed model.

``--full`` adds: batch 128; the all-3x3 configuration (every 3x3 conv but the stem); channels_last
rows (model and input converted); ``torch.compile`` rows (dense and the optimised compressed model,
NCHW); ONNX Runtime rows (both models exported with ``torch.onnx.export``, the factorised layers
lowered to standard convolutions, run by ONNX Runtime's CPU provider); 1 and 2 threads; 3x224x224 at
batch 1 and 32; and the per-layer table (every distinct 3x3 conv shape of resnet18, dense vs the
fused ops vs their chains). Each option can also be chosen alone (``--batches``, ``--configs``,
``--layouts``, ``--compile``, ``--onnx``, ``--threads``, ``--inputs``, ``--per-layer``).

Candidates of one table are timed in interleaved rounds (7 rounds, median) so that the slow phases of
a noisy machine hit all of them alike. Results go to ``--json`` (default
``bench_results/latency-<device>.json``).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from common import environment, median_times, print_environment, print_table, resnet18, tdconv, write_json
from tdconv.compress import count_complexity

INPUTS = {"imagenet32": ("imagenet", 32), "cifar32": ("cifar", 32), "imagenet224": ("imagenet", 224)}
ROUNDS = 7
START = time.perf_counter()


def progress(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.0f} s] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the whole sweep (tens of minutes on 2 CPU cores)")
    mode.add_argument("--quick", action="store_true", help="CI smoke run: batch 8, short timings, headline rows")
    p.add_argument("--inputs", default=None, help="comma list of imagenet32,cifar32,imagenet224")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,32; --full 1,32,128)")
    p.add_argument("--configs", default=None, help="comma list of seed,all3x3 (default seed; --full both)")
    p.add_argument("--layouts", default=None, help="comma list of nchw,channels_last (default nchw; --full both)")
    p.add_argument("--threads", default=None, help="comma list of CPU thread counts (default torch's; --full 1,2)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument("--onnx", action="store_true", help="add ONNX Runtime rows")
    p.add_argument("--per-layer", action="store_true", help="add the per-layer table")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed runs per candidate, over all rounds (default 2; --quick 0.05)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda requested but torch sees no CUDA device\n")
    full = args.full
    args.inputs = (args.inputs or ("imagenet32,imagenet224" if full else "imagenet32")).split(",")
    for name in args.inputs:
        if name not in INPUTS:
            p.error(f"--inputs: unknown input {name!r} (choose from {', '.join(INPUTS)})")
    default_batches = "8" if args.quick else ("1,32,128" if full else "1,32")
    args.batches = [int(b) for b in (args.batches or default_batches).split(",")]
    args.configs = (args.configs or ("seed,all3x3" if full else "seed")).split(",")
    args.layouts = (args.layouts or ("nchw,channels_last" if full else "nchw")).split(",")
    for layout in args.layouts:
        if layout not in ("nchw", "channels_last"):
            p.error(f"--layouts: unknown layout {layout!r} (nchw or channels_last)")
    threads = args.threads or ("1,2" if full and not gpu else str(torch.get_num_threads()))
    args.threads = [int(t) for t in threads.split(",")]
    args.compile = args.compile or full
    args.onnx = args.onnx or (full and not gpu)
    args.per_layer = args.per_layer or full
    args.min_time = args.min_time or (0.05 if args.quick else 2.0)
    args.json = args.json or Path(f"bench_results/latency-{args.device}.json")
    return args


def median_latencies(fns: dict, device, min_time: float) -> dict:
    """Median seconds per call of each function, over 7 rounds that each time every function in turn,
    after 3 warm-up calls (which also let ``implementation="auto"`` make its choices)."""
    return median_times(fns, rounds=ROUNDS, warmup=3, min_time=min_time, device=device)


def factorise(model: nn.Module, config: str, method: str) -> nn.Module:
    """``model`` compressed as a user would: "seed" (conv2 of every BasicBlock) or "all3x3"
    (tdconv.compress's default: every 3x3 conv but the stem), rank C/2, default settings."""
    layers = "seed" if config == "seed" else None
    # Latency does not depend on the fit: a few sweeps keep the set-up short.
    return tdconv.compress(copy.deepcopy(model), method, 0.5, layers=layers, n_iter_max=3, seed=0,
                           progress=False)[0].eval()


def onnx_session(model: nn.Module, x: torch.Tensor, threads: int, tmp: str, name: str):
    import onnxruntime as ort

    path = os.path.join(tmp, f"{name}.onnx")
    if not os.path.exists(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def model_rows(args, device, input_name: str, threads: int, tmp: str) -> list:
    stem, res = INPUTS[input_name]
    dense = resnet18(stem).eval().to(device)
    models = {"dense": dense}
    for config in args.configs:
        for method in ("cp", "tucker"):
            models[f"{method}-{config}"] = factorise(dense, config, method)
    info = {k: count_complexity(m, (3, res, res)) for k, m in models.items()}
    # The dense model optimised too (its BatchNorms folded into its convs): the fair reference of the
    # optimised compressed ones, reported beside the plain one.
    optimised = {k: tdconv.optimize_for_inference(m) for k, m in models.items()}
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, res, res, device=device)
        fns, base = {}, {}

        def add(label, fn, model_key):
            fns[label], base[label] = fn, model_key

        if "channels_last" not in args.layouts:  # the faster dense layout is the reference, whichever it is
            dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            add("dense/channels_last", lambda: dense_cl(x_cl), "dense")
        for layout in args.layouts:
            cl = layout == "channels_last"
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x
            tag = "/channels_last" if cl else ""
            md = copy.deepcopy(dense).to(memory_format=torch.channels_last) if cl else dense
            add(f"dense{tag}", lambda m=md, xi=xi: m(xi), "dense")
            mdo = copy.deepcopy(optimised["dense"]).to(memory_format=torch.channels_last) if cl else optimised["dense"]
            add(f"dense +opt{tag}", lambda m=mdo, xi=xi: m(xi), "dense")
            for key, m in models.items():
                if key == "dense":
                    continue
                mc = copy.deepcopy(m).to(memory_format=torch.channels_last) if cl else m
                mo = copy.deepcopy(optimised[key]).to(memory_format=torch.channels_last) if cl else optimised[key]
                if not cl:
                    add(f"{key} default", lambda m=mc, xi=xi: m(xi), key)
                add(f"{key} +opt{tag}", lambda m=mo, xi=xi: m(xi), key)
        if args.compile:
            progress(f"{input_name} batch {batch}, {threads} threads: compiling")
            for key in ["dense"] + [k for k in models if k != "dense"]:
                compiled = torch.compile(dense if key == "dense" else optimised[key], dynamic=False)
                with torch.inference_mode():
                    compiled(x)  # the compilation itself, outside the timing
                add(f"{key}{'' if key == 'dense' else ' +opt'}/compile", lambda m=compiled: m(x), key)
        if args.onnx and device.type == "cpu":
            progress(f"{input_name} batch {batch}, {threads} threads: exporting to ONNX")
            feed = {"x": x.numpy()}
            for key in ["dense"] + [k for k in models if k != "dense"]:
                sess = onnx_session(dense if key == "dense" else optimised[key], x, threads, tmp, f"{input_name}-{key}")
                add(f"{key}{'' if key == 'dense' else ' +opt'}/onnxruntime", lambda s=sess: s.run(None, feed), key)
        progress(f"{input_name} batch {batch}, {threads} threads: timing {len(fns)} candidates")
        with torch.inference_mode():
            times = median_latencies(fns, device, args.min_time)
        reference = min(t for k, t in times.items() if k in ("dense", "dense/channels_last"))
        reference_opt = min(t for k, t in times.items() if k in ("dense +opt", "dense +opt/channels_last"))
        refs = {"compile": times.get("dense/compile"), "onnxruntime": times.get("dense/onnxruntime")}
        for label, t in times.items():
            macs, params = info[base[label]]
            runtime = label.rsplit("/", 1)[-1] if "/" in label else "eager"
            same = refs.get(runtime)
            rows.append({"input": input_name, "batch": batch, "threads": threads, "model": label, "ms": t * 1e3,
                         "vs_dense": t / reference, "vs_dense_opt": t / reference_opt if runtime == "eager" else None,
                         "vs_same_runtime_dense": t / same if same else None,
                         "mmacs": macs / 1e6, "mparams": params / 1e6})
    return rows


def layer_rows(args, device, input_name: str) -> list:
    """Per layer: every distinct 3x3 conv shape of resnet18 at this input, dense vs the fused ops vs their
    chains (NCHW, rank C/2)."""
    stem, res = INPUTS[input_name]
    model = resnet18(stem).eval()
    shapes = {}

    def record(name):
        def hook(mod, inp, out):
            shapes.setdefault((mod.in_channels, mod.out_channels, mod.stride, tuple(inp[0].shape[2:])), (name, mod))
        return hook

    hooks = [mod.register_forward_hook(record(n)) for n, mod in model.named_modules()
             if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)]
    with torch.no_grad():
        model(torch.randn(1, 3, res, res))
    for h in hooks:
        h.remove()
    rows = []
    for (cin, cout, stride, hw), (name, conv) in shapes.items():
        conv = conv.to(device)
        layers = {"cp": tdconv.FactorizedConv2d.from_conv(conv, method="cp", rank=0.5, n_iter_max=3, seed=0).eval(),
                  "tucker": tdconv.FactorizedConv2d.from_conv(conv, method="tucker", rank=0.5, n_iter_max=3).eval()}
        for batch in args.batches:
            xi = torch.randn(batch, cin, *hw, device=device)
            row = {"layer": name, "shape": f"{cout}x{cin}x3x3/s{stride[0]}", "input": f"{hw[0]}x{hw[1]}",
                   "batch": batch}
            fns = {"dense": lambda: conv(xi)}
            for method, layer in layers.items():
                unfused = copy.deepcopy(layer)
                unfused.implementation = "unfused"
                fns[f"{method}_unfused"] = lambda m=unfused: m(xi)
                fused = copy.deepcopy(layer)
                fused.implementation = "fused"  # also a kernel not yet validated on this device
                reasons = fused.fused_unsupported_reasons(xi)
                if reasons:
                    row[f"{method}_fused_reasons"] = reasons
                else:
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


def print_rows(rows: list, cols: list) -> None:
    print_table(cols, [[r.get(c) for c in cols] for r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(device, layouts=",".join(args.layouts))
    print_environment(env, ["layouts"])
    result = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "layers": [], "models": []}
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        for input_name in args.inputs:
            for threads in args.threads:
                torch.set_num_threads(threads)
                rows = model_rows(args, device, input_name, threads, tmp)
                print(f"\n== {input_name}, {threads} threads: latency; vs_dense is against the faster of dense NCHW "
                      f"and dense channels_last in the same run ==")
                print_rows(rows, ["batch", "model", "ms", "vs_dense", "vs_dense_opt", "vs_same_runtime_dense", "mmacs",
                                  "mparams"])
                print()
                result["models"] += rows
            torch.set_num_threads(default_threads)
            if args.per_layer:
                progress(f"{input_name}: per-layer table")
                rows = layer_rows(args, device, input_name)
                print(f"\n== per layer: distinct 3x3 convs of resnet18 at {input_name}, rank C/2, NCHW ==")
                print_rows(rows, ["layer", "shape", "input", "batch", "dense_ms", "cp_unfused_ms", "cp_fused_ms",
                                  "cp_fused_vs_unfused", "cp_fused_vs_dense", "tucker_unfused_ms", "tucker_fused_ms",
                                  "tucker_fused_vs_unfused", "tucker_fused_vs_dense"])
                result["layers"] += [dict(r, input_set=input_name) for r in rows]
    write_json(args.json, result)
    progress(f"done: medians of {ROUNDS} rounds; results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
