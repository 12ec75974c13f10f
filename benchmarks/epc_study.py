"""CP with and without error preserving correction (EPC) on a trained ResNet18: per-layer kernel error,
sum of squared component norms, largest component norm and sensitivity, and the model's accuracy right
after the decomposition and after fine-tuning (two `tdconv experiment` runs from the same dense weights).

    python benchmarks/epc_study.py --weights runs/NAME/dense.pt --dataset npz:DIR --out runs
    python benchmarks/epc_study.py --weights dense.pt --dataset synthetic --finetune-epochs 1 --quick

Prints a markdown table and writes OUT/epc-study.json and OUT/epc-study.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common import environment, print_environment
from tdconv.cli import main as tdconv_main


def run(args, epc: bool) -> dict:
    name = f"epc-{'on' if epc else 'off'}"
    cmd = ["experiment", "--weights", args.weights, "--dataset", args.dataset, "--methods", "dense,cp",
           "--rank", args.rank, "--layers", args.layers, "--finetune-epochs", str(args.finetune_epochs),
           "--n-iter-max", str(args.n_iter_max), "--out", args.out, "--name", name, "--seed", str(args.seed),
           "--latency-runs", "0", "--quiet"] + (["--epc"] if epc else [])
    if args.stem:
        cmd += ["--stem", args.stem]
    if args.train_subset:
        cmd += ["--train-subset", str(args.train_subset)]
    if args.resume:
        cmd += ["--resume"]
    rc = tdconv_main(cmd)
    if rc:
        raise SystemExit(rc)
    with open(os.path.join(args.out, name, "results.json")) as f:
        return json.load(f)


def table(off: dict, on: dict) -> str:
    lines = ["| layer | kernel error (ALS / +EPC) | sum comp^2 / ||W||^2 (ALS / +EPC) | largest comp. / ||W|| "
             "(ALS / +EPC) | sensitivity (ALS / +EPC) |", "|---|---|---|---|---|"]
    for a, b in zip(off["models"]["cp"]["layers"], on["models"]["cp"]["layers"]):
        lines.append(f"| {a['name']} | {a['rel_error']:.4f} / {b['rel_error']:.4f} | {a['norm_ratio']:.3f} / "
                     f"{b['norm_ratio']:.3f} | {_rel_max(a):.3f} / {_rel_max(b):.3f} | {a['sensitivity']:.4g} / "
                     f"{b['sensitivity']:.4g} |")
    ma, mb = off["models"], on["models"]
    lines += ["", "| | dense | CP (ALS) | CP + EPC |", "|---|---|---|---|"]
    lines.append(f"| right after decomposition | {ma['dense']['accuracy']:.2f} | {ma['cp']['after_decomposition']:.2f} | "
                 f"{mb['cp']['after_decomposition']:.2f} |")
    lines.append(f"| + BatchNorm statistics re-estimated | | {ma['cp']['after_bn']:.2f} | {mb['cp']['after_bn']:.2f} |")
    for i, (ra, rb) in enumerate(zip(ma["cp"].get("finetune", []), mb["cp"].get("finetune", []))):
        lines.append(f"| after fine-tuning epoch {i + 1} | | {ra['test_acc']:.2f} | {rb['test_acc']:.2f} |")
    lines.append(f"| decomposition time (s) | | {ma['cp']['decompose_seconds']:.1f} | {mb['cp']['decompose_seconds']:.1f} |")
    return "\n".join(lines)


def _rel_max(layer: dict) -> float:
    """The largest component norm relative to ||W||."""
    return layer["max_component_norm"] / layer["kernel_norm"] if layer.get("kernel_norm") else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="trained dense state dict (e.g. runs/NAME/dense.pt)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--stem", choices=("imagenet", "cifar"))
    p.add_argument("--rank", default="0.5")
    p.add_argument("--layers", default="seed")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--n-iter-max", type=int, default=100)
    p.add_argument("--train-subset", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    env = environment()
    print_environment(env)
    off, on = run(args, False), run(args, True)
    text = table(off, on)
    print(text)
    with open(os.path.join(args.out, "epc-study.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "epc-study.json"), "w") as f:
        json.dump({"environment": env, "als": off["models"], "epc": on["models"]}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
