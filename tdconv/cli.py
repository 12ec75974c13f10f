"""The ``tdconv`` command line (also ``python -m tdconv``).

    tdconv info
    tdconv compress --model resnet18 --num-classes 10 --method cp --rank 0.5 --layers seed --out small.pt
    tdconv compress --model timm:efficientnet_b0 --target-macs 0.5 --input-size 3,224,224 --out small.pt
    tdconv compress --model resnet18 --method tucker --target-macs 0.5 --weights dense.pt --out small.pt
    tdconv compress --model resnet18 --method tucker --weights dense.pt --calibration 2048 --dataset npz:DIR
    tdconv report small.pt
    tdconv experiment --dataset npz:cifar10 --epochs 15 --finetune-epochs 5 --out runs

Models are torchvision models by name, or timm models (``timm:NAME``, with timm installed), built with
random weights (``--weights`` loads a state dict; nothing is ever downloaded).
"""
from __future__ import annotations

import argparse
import sys

from tdconv.apps import options
from tdconv.apps.models import (build_from_meta, build_model, load_weights, model_meta, parse_device,
                                parse_fraction, parse_input_size, parse_layers, parse_rank)

__all__ = ["main"]


def cmd_compress(args) -> int:
    import tdconv
    try:
        model = build_model(args.model, args.num_classes)
    except ValueError as exc:
        raise SystemExit(f"error: --model: {exc}") from None
    if args.weights:
        load_weights(model, args.weights)
    model = model.to(args.device).eval()
    layers = parse_layers(args.layers)
    engine = {"n_iter_max": args.n_iter_max}
    if args.seed is not None:
        engine["seed"] = args.seed
    if args.calibration:
        from tdconv.apps.data import calibration_images, load_dataset
        try:
            data = load_dataset(args.dataset, args.data_root)
            if data.shape != tuple(args.input_size):
                raise ValueError(f"--dataset {args.dataset} has images {data.shape}; --input-size is "
                                 f"{tuple(args.input_size)}")
            engine.update(calibration=calibration_images(data, args.calibration, seed=args.seed or 0),
                          refine_steps=args.refine_steps)
        except ValueError as exc:
            raise SystemExit(f"error: --calibration: {exc}") from None
    try:
        small, report = tdconv.compress(model, args.method, args.rank, layers=layers, target_macs=args.target_macs,
                                        target_params=args.target_params, min_rank=args.min_rank,
                                        bias=True if args.bias else None,
                                        input_size=args.input_size, inplace=True, progress=not args.quiet,
                                        **engine)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(report)
    if args.out:
        tdconv.save(small, args.out, meta={**model_meta(args.model, args.num_classes, input_size=args.input_size),
                                          "report": report.to_dict()})
        print(f"saved to {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    return 0


def _saved_report(saved):
    from tdconv import CompressionReport
    try:
        return CompressionReport.from_dict(saved)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"its metadata 'report' is incomplete or damaged: {exc}") from None


def cmd_report(args) -> int:
    import tdconv
    from tdconv.compress import count_complexity
    from tdconv.serialization import read
    try:
        payload = read(args.path)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    meta = payload.get("meta") or {}
    saved = meta.get("report")
    try:
        if saved is not None:
            print(_saved_report(saved))
        else:
            print(f"{args.path}: {len(payload['layers'])} factorised layer(s): " + ", ".join(payload["layers"]))
        if "model" not in meta:
            return 0
        # rebuild it and count again: the figures are those of the file's weights
        model, description = build_from_meta(meta)
    except ValueError as exc:
        raise SystemExit(f"error: {args.path}: {exc}") from None
    try:
        model = tdconv.load(args.path, model)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"error: {args.path}: the {description} that its metadata describes does not fit the "
                         f"file's weights: {str(exc).strip()}") from None
    size = tuple(saved["input_size"]) if saved is not None else \
        tuple(meta.get("input_size") or (meta.get("in_channels", 3), 32, 32))
    macs, params = count_complexity(model, size)
    print(f"rebuilt {meta['model']} from the file: {macs / 1e6:.2f} MMac, {params / 1e6:.2f} M parameters at "
          f"{'x'.join(map(str, size))}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tdconv", description="Tensor-decomposed convolutions that are actually faster.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, what was built, the GPU, and why anything is unavailable")
    c = sub.add_parser("compress", help="factorise a torchvision or timm model's layers and print the report")
    c.add_argument("--model", required=True, help="torchvision model name (resnet18) or timm:NAME (timm:efficientnet_b0)")
    c.add_argument("--num-classes", type=int, default=10)
    c.add_argument("--weights", help="state dict to load into the model before compressing")
    c.add_argument("--method", choices=("auto", "cp", "cp4", "tucker", "svd"), default="auto",
                   help="auto: Tucker-2 for spatial convs, SVD for 1x1 convs and linear layers; cp, cp4, tucker: "
                        "spatial convs only; svd: 1x1 convs and linear layers only")
    c.add_argument("--rank", type=parse_rank, default=0.5, help="int, 'R_out,R_in', a fraction of the channels, evbmf or energy=F")
    c.add_argument("--target-macs", type=parse_fraction, help="whole-model MAC budget, a fraction of the model's")
    c.add_argument("--target-params", type=parse_fraction, help="whole-model parameter budget, a fraction")
    c.add_argument("--min-rank", type=float, default=0.0,
                   help="with a budget: no layer below this fraction of its channels (e.g. 0.125)")
    c.add_argument("--layers", default="all", help="all (every eligible layer), seed, or comma-separated names")
    c.add_argument("--bias", action="store_true", help="give every factorised layer a bias (as the seed did)")
    c.add_argument("--input-size", type=parse_input_size, default=(3, 32, 32), help="C,H,W of the MAC counts")
    c.add_argument("--n-iter-max", type=int, default=100, help="decomposition sweeps per layer")
    c.add_argument("--seed", type=int, default=0, help="seed of the CP initialisation")
    c.add_argument("--device", type=parse_device, default="cpu", help="where to decompose (cpu, cuda, cuda:N)")
    c.add_argument("--calibration", type=int, default=0, metavar="N",
                   help="fit each layer to its outputs on N training images of --dataset (no labels); 0: kernel fits")
    c.add_argument("--dataset", default="cifar10", help="calibration images: cifar10, fashion-mnist, npz:DIR, synthetic")
    c.add_argument("--data-root", default="data", help="where torchvision data sets live or are downloaded to")
    c.add_argument("--refine-steps", type=int, default=0, help="with --calibration: Adam steps per residual block")
    c.add_argument("--out", help="write the compressed model (tdconv.save format)")
    c.add_argument("--json", help="write the report as JSON")
    c.add_argument("--quiet", action="store_true", help="no progress line")
    r = sub.add_parser("report", help="print the report of a model saved by 'tdconv compress --out' or "
                                          "'tdconv experiment' and count its rebuilt model again")
    r.add_argument("path")
    e = sub.add_parser("experiment", help="train dense, compress with CP and Tucker, fine-tune, report (the seed's "
                                          "experiment); resumable, runs under torchrun")
    options.add_arguments(e)
    args = p.parse_args(argv)
    if args.command == "info":
        from tdconv import info
        return info.main()
    if args.command == "compress":
        return cmd_compress(args)
    if args.command == "experiment":
        return cmd_experiment(args)
    return cmd_report(args)


def cmd_experiment(args) -> int:
    from tdconv.apps import experiment, train
    from tdconv.apps.data import DatasetError
    try:
        experiment.run(args)
    except train.Interrupted as exc:
        print(f"\ninterrupted by signal {exc.signum}; the run's checkpoints are saved. Continue it with the same "
              f"command and --resume", file=sys.stderr)
        return 130
    except (DatasetError, train.CheckpointMismatch, train.Diverged, FileExistsError, ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
