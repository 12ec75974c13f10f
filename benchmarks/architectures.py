"""Every CNN a user brings: ``compress(model, method="auto", target_macs=0.5)`` on eight architectures of
different families, with the MAC and parameter fractions it reached and the CPU latency of the dense and
the compressed model at batch 1 and 32, measured in one run.

    python benchmarks/architectures.py                 # the table (3x224x224, all eight; several minutes)
    python benchmarks/architectures.py --quick         # a smoke run: 3x64x64, two models, short timings
    python benchmarks/architectures.py --models resnet18,timm:efficientnet_b0 --batches 1

Models are built with random weights (torchvision by name, timm as ``timm:NAME``; nothing is
downloaded), in eval mode, NCHW, at the default settings a user gets. Latencies are medians of
interleaved rounds (dense and compressed timed in turn in every round), so that their ratio is measured
under the same conditions. Rows are written to the JSON file as each architecture completes.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import environment, median_times, print_environment, print_table, tdconv, write_json

# (family, model): one architecture of each family, from torchvision or timm.
MODELS = [
    ("residual", "resnet18"),
    ("bottleneck", "resnet50"),
    ("VGG-style", "vgg11_bn"),
    ("inverted residual", "mobilenet_v2"),
    ("squeeze-excitation", "timm:efficientnet_b0"),
    ("grouped (RegNet)", "regnet_x_400mf"),
    ("ConvNeXt-style", "timm:convnext_atto"),
    ("dense connections", "densenet121"),
]
QUICK_MODELS = ["resnet18", "mobilenet_v2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3x64x64, two models, short timings")
    p.add_argument("--models", help="comma-separated model names (default: the eight of the table)")
    p.add_argument("--batches", default="1,32", help="batch sizes to time (default 1,32)")
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--size", type=int, default=None, help="input height and width (default 224; --quick: 64)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per model and batch")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.quick else 224)
    args.min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 3.0)
    args.batches = [int(b) for b in args.batches.split(",")]
    families = dict((m, f) for f, m in MODELS)
    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else [m for _, m in MODELS])
    args.models = [(families.get(n, "-"), n) for n in names]
    args.json = args.json or Path("bench_results/architectures.json")
    return args


def build(name: str) -> torch.nn.Module:
    from tdconv.apps.models import build_model
    torch.manual_seed(0)
    return build_model(name, 1000).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment("cpu", benchmark="architectures", input_size=[3, args.size, args.size],
                      target_macs=args.target_macs)
    print_environment(env)
    rows = []
    result = {"environment": env, "rows": rows}
    for family, name in args.models:
        model = build(name)
        t0 = time.perf_counter()
        small, report = tdconv.compress(model, "auto", target_macs=args.target_macs,
                                        input_size=(3, args.size, args.size))
        seconds = time.perf_counter() - t0
        small.eval()
        row = {"family": family, "model": name, "macs_dense": report.macs_before, "macs_fraction":
               report.macs_after / report.macs_before, "params_dense": report.params_before,
               "params_fraction": report.params_after / report.params_before, "factorised": len(report.layers),
               "left_dense": len(report.skipped), "compress_seconds": seconds}
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            with torch.inference_mode():
                torch.testing.assert_close(small(x).shape, model(x).shape)
                t = median_times({"dense": lambda: model(x), "compressed": lambda: small(x)}, rounds=5, warmup=2,
                                 min_time=args.min_time)
            row[f"b{batch}_dense_ms"] = 1e3 * t["dense"]
            row[f"b{batch}_compressed_ms"] = 1e3 * t["compressed"]
            row[f"b{batch}_ratio"] = t["compressed"] / t["dense"]
        rows.append(row)
        write_json(args.json, result)
        print(f"[{name}] MACs {row['macs_fraction']:.4f}, params {row['params_fraction']:.4f}, "
              + ", ".join(f"b{b} {row[f'b{b}_ratio']:.3f}x" for b in args.batches), flush=True)
    cols = ["family", "model", "GMAC", "MACs", "params", "layers f/d"]
    for b in args.batches:
        cols += [f"b{b} dense ms", f"b{b} comp. ms", f"b{b} ratio"]
    body = []
    for r in rows:
        line = [r["family"], r["model"], r["macs_dense"] / 1e9, r["macs_fraction"], r["params_fraction"],
                f"{r['factorised']}/{r['left_dense']}"]
        for b in args.batches:
            line += [r[f"b{b}_dense_ms"], r[f"b{b}_compressed_ms"], r[f"b{b}_ratio"]]
        body.append(line)
    print()
    print_table(cols, body, right=tuple(range(2, len(cols))))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
