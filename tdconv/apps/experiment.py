"""``tdconv experiment``: train a dense model, compress it with CP and Tucker, fine-tune, and report.

The seed's question, answered end to end: how much accuracy does a compressed ResNet18 keep right
after decomposition, after re-estimating BatchNorm statistics, after each fine-tuning epoch, and how
fast is it? Every phase is checkpointed; ``--resume`` continues a killed run where it stopped.

Files of a run, in ``OUT/NAME/``: ``args.json`` (the arguments that define the run), ``results.json``,
``results.md`` (the table), ``log.jsonl`` (one line per epoch), ``accuracy_vs_epoch.png``,
``dense.pt`` (state dict), ``<method>.pt`` (:func:`tdconv.save` format), checkpoints ``*.ckpt``.
``OUT/accuracy_vs_macs.png`` plots every model of every run in ``OUT``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time

import torch

import tdconv
from tdconv.compress import count_complexity
from tdconv.utils import atomic_save, atomic_write_json, atomic_write_text, describe_environment, median_times

from . import train as T
from .data import calibration_images, load_dataset
from .distributed import barrier, init_distributed
from .models import build_model, is_resnet, load_weights, model_meta, parse_layers
from .options import DEFAULT_CALIBRATION, RUN_ARGUMENTS, defaults

__all__ = ["run", "measure_latency"]

# ------------------------------------------------------------------------------------------------ output
def _fmt_acc(v):
    return "-" if v is None else f"{v:.2f}"


def _table(results: dict) -> str:
    models = results["models"]
    ft = max([len(m.get("finetune", [])) for m in models.values()] + [0])
    head = ["model", "MMac", "params (M)", "after decomposition", "+ BN re-estimated"] + \
        [f"fine-tune ep {i + 1}" for i in range(ft)] + ["final", "vs dense", "latency (ms)", "vs dense",
                                                        "time: train / decompose / fine-tune (s)"]
    dense = models.get("dense", {})
    rows = []
    for name, m in models.items():
        eps = [r["test_acc"] for r in m.get("finetune", [])]
        eps += [None] * (ft - len(eps))
        final = m.get("accuracy")
        delta = "-" if name == "dense" or final is None or dense.get("accuracy") is None else \
            f"{final - dense['accuracy']:+.2f}"
        lat = m.get("latency_ms")
        lat_ratio = "-" if lat is None or not dense.get("latency_ms") or name == "dense" else \
            f"{lat / dense['latency_ms']:.2f}x"
        times = " / ".join("-" if m.get(k) is None else f"{m[k]:.0f}"
                           for k in ("train_seconds", "decompose_seconds", "finetune_seconds"))
        rows.append([name, f"{m['macs'] / 1e6:.2f}", f"{m['params'] / 1e6:.2f}", _fmt_acc(m.get("after_decomposition")),
                     _fmt_acc(m.get("after_bn"))] + [_fmt_acc(v) for v in eps] +
                    [_fmt_acc(final), delta, "-" if lat is None else f"{lat:.2f}", lat_ratio, times])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    a = results["args"]
    env = results.get("environment", {})
    subset = "" if a["train_subset"] is None else f" (train subset {a['train_subset']})"
    lines += ["", f"{a['model']} ({a['stem']} stem) on {a['dataset']}{subset}, layers {a['layers']}, rank {a['rank']}, "
              f"{a['epochs']} dense epochs, {a['finetune_epochs']} fine-tuning epochs, seed {a['seed']}. Accuracy in % "
              f"on the test set; MACs and params by ptflops at {'x'.join(map(str, results['input_size']))}; latency: "
              f"median of interleaved runs at batch {results.get('latency_batch')} on {env.get('device', '?')}."]
    if "dense+ft" in models:
        lines += ["", "dense+ft: the control, the dense model fine-tuned with the fine-tuning epochs and schedule of "
                  "the compressed rows."]
    for name, m in models.items():
        c = m.get("calibration")
        if c:
            bn = c.get("batchnorm", {})
            kept = sum(1 for r in c.get("refine", []) if r.get("kept"))
            fits = [r.get("fit", "kernel") for r in m.get("layers", [])]
            lines.append(f"{name}: data-aware fits on {c['images']} calibration images ({c['held_out_images']} more "
                         f"held out), {'sequential' if c['sequential'] else 'independent'}, "
                         f"{fits.count('data')}/{len(fits)} layers kept the data fit, BatchNorm "
                         f"{'re-estimated' if bn.get('reestimated') else 'not re-estimated'} "
                         + (f"({bn['reason']})" if "reason" in bn else
                            f"({'it lowered' if bn.get('reestimated') else 'it did not lower'} the held-out output "
                            "error)")
                         + (f", {kept}/{len(c['refine'])} block refinements kept" if c.get("refine") else "")
                         + f", {c['seconds']:.0f} s.")
    return "\n".join(lines)


def _plots(out_dir: str, results: dict) -> list:
    """PNG plots; returns the paths written (none when matplotlib is missing, with a note on stderr)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'tdconv[experiment]')", file=sys.stderr)
        return []
    written = []
    models = results["models"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        if name == "dense":
            if m.get("accuracy") is not None:
                ax.axhline(m["accuracy"], color="k", ls="--", label=f"dense {m['accuracy']:.1f}%")
            continue
        xs, ys = [0], [m.get("after_bn", m.get("after_decomposition"))]
        for r in m.get("finetune", []):
            xs.append(r["epoch"])
            ys.append(r["test_acc"])
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("fine-tuning epoch (0: right after decomposition)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['args']['model']} on {results['args']['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out_dir, "accuracy_vs_epoch.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    parent = os.path.dirname(os.path.abspath(out_dir))
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in sorted(os.listdir(parent)):
        try:
            with open(os.path.join(parent, run, "results.json")) as f:
                other = json.load(f)
        except (OSError, ValueError):
            continue
        pts = [(n, m["macs"], m["accuracy"]) for n, m in other.get("models", {}).items()
               if m.get("accuracy") is not None]
        if pts:
            ax.scatter([p[1] / 1e6 for p in pts], [p[2] for p in pts], label=run)
            for n, x, y in pts:
                ax.annotate(n, (x / 1e6, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("MMac per image")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = os.path.join(parent, "accuracy_vs_macs.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ latency
def measure_latency(models: dict, shape: tuple, device, *, runs: int = 20, warmup: int = 3) -> dict:
    """Median inference latency (ms) of each model on a random batch ``shape``, the models interleaved
    within each round so that they see the same machine state."""
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)

    def call(m):
        def forward():
            with torch.no_grad():
                m(x)
        return forward

    for m in models.values():
        m.eval()
    seconds = median_times({n: call(m) for n, m in models.items()}, rounds=runs, warmup=warmup, device=device)
    return {n: 1e3 * t for n, t in seconds.items()}


# ------------------------------------------------------------------------------------------------- run
def _run_dir(args) -> str:
    if args.name:
        return os.path.join(args.out, args.name)
    dataset = args.dataset.replace("npz:", "npz-").replace(os.sep, "_").strip("_")
    layers = args.layers if len(args.layers) < 20 else "custom"
    return os.path.join(args.out, f"{args.model}-{args.stem}-{dataset}-{layers}-r{args.rank}-seed{args.seed}")


def run(args) -> dict:
    """Run (or resume) the experiment described by ``args`` (the parsed command line); returns the results."""
    run_args = {k: getattr(args, k) for k in RUN_ARGUMENTS}
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ("dense", "cp", "cp4", "tucker")]
    if unknown or not methods:
        raise ValueError(f"--methods must be a comma-separated subset of dense,cp,cp4,tucker; got {args.methods!r}")
    if args.latency_batch < 1 or args.latency_runs < 0:
        raise ValueError(f"--latency-batch must be >= 1 and --latency-runs >= 0, got {args.latency_batch} and "
                         f"{args.latency_runs}")
    if (args.calibration is not None and args.calibration < 0) or args.refine_steps < 0:
        raise ValueError(f"--calibration and --refine-steps must be >= 0, got {args.calibration} and "
                         f"{args.refine_steps}")
    if not is_resnet(args.model):  # fail before any work
        raise ValueError(f"--model must be a torchvision ResNet (resnet18, resnet34, resnet50, ...), got {args.model!r}")
    common = dict(batch_size=args.batch_size, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                  schedule=args.schedule, seed=args.seed)
    dense_cfg = T.TrainConfig(epochs=args.epochs, lr=args.lr, warmup_epochs=args.warmup_epochs, **common)
    finetune_cfg = T.TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, warmup_epochs=0.0,
                                 distill=args.distill, **common)
    out_dir = _run_dir(args)
    rank, world, device = init_distributed(args.device)
    lead = rank == 0
    args_path = os.path.join(out_dir, "args.json")
    if os.path.exists(args_path):
        if not args.resume:
            raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another "
                                  f"--out / --name")
        with open(args_path) as f:
            saved = json.load(f)
        # An argument added to tdconv after the run started is taken at its default value.
        default = defaults()
        saved = {**{k: default[k] for k in RUN_ARGUMENTS if k not in saved}, **saved}
        diffs = T.config_differences(saved, json.loads(json.dumps(run_args)))
        if diffs:
            raise T.CheckpointMismatch(f"{out_dir} was started with other arguments; refusing to resume. Differences "
                                       f"(saved -> now): {'; '.join(diffs)}")

    data = load_dataset(args.dataset, args.data_root)
    if args.train_subset or args.test_subset:
        data = data.subset(args.train_subset, args.test_subset, seed=args.seed)
    n_calibration = min(DEFAULT_CALIBRATION, len(data.y_train)) if args.calibration is None else args.calibration
    if n_calibration > len(data.y_train):
        raise ValueError(f"--calibration {args.calibration} is more than the {len(data.y_train)} training images")
    data = data.to(device)
    # Bad compression arguments (ranks, layers, budgets) fail now, not after the dense phase: each method
    # once, with one sweep, on an untrained model (the random state is left as it was).
    with torch.random.fork_rng():
        for method in (m for m in methods if m != "dense"):
            try:
                tdconv.compress(build_model(args.model, data.num_classes, stem=args.stem, in_channels=data.shape[0]),
                                method, args.rank, layers=parse_layers(args.layers), target_macs=args.target_macs,
                                target_params=args.target_params, min_rank=args.min_rank, input_size=data.shape,
                                n_iter_max=1, progress=False)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"the compression arguments do not fit {args.model} (method {method}): {exc}") \
                    from None
    if lead and not os.path.exists(args_path):
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(args_path, run_args)
    barrier()
    input_size = data.shape
    results_path = os.path.join(out_dir, "results.json")
    results = {"args": run_args, "input_size": list(input_size), "num_classes": data.num_classes, "models": {}}
    if os.path.exists(results_path) and args.resume:
        with open(results_path) as f:
            results["models"] = json.load(f).get("models", {})
    log = os.path.join(out_dir, "log.jsonl")
    progress = not args.quiet

    def save_results():
        if lead:
            atomic_write_json(results_path, results)

    def say(text):
        if lead and progress:
            print(text, file=sys.stderr)

    def check_signal(stop):
        if stop["signum"]:
            raise T.Interrupted(stop["signum"], out_dir)

    torch.manual_seed(args.seed)
    # Training and evaluation skip kernel taps that only read padding (same function, far less work on
    # small images: ResNet18's layer4 sees 1x1 maps at 32x32); latency is measured on the plain models.
    base = lambda: tdconv.skip_padding_taps(  # noqa: E731
        build_model(args.model, data.num_classes, stem=args.stem, in_channels=input_size[0]))
    meta = model_meta(args.model, data.num_classes, stem=args.stem, in_channels=input_size[0], input_size=input_size)
    finals = {}
    # Deterministic implementation choices while training and evaluating; the caller's setting returns
    # afterwards, also when the run stops early.
    with tdconv.nn.autotuning(False), T.stop_on_signals() as stop:
        # ---- dense
        dense = base().to(device)
        dense_path = os.path.join(out_dir, "dense.pt")
        record = results["models"].get("dense")
        if record is not None and record.get("done") and os.path.exists(dense_path):
            dense.load_state_dict(torch.load(dense_path, map_location=device, weights_only=True))
        else:
            t0 = time.perf_counter()
            history = []
            if args.weights:
                load_weights(dense, args.weights)
                dense.to(device)
            else:
                history = T.fit(dense, data, dense_cfg, device=device, checkpoint=os.path.join(out_dir, "dense.ckpt"),
                                resume=args.resume, log=log, label="dense", progress=progress,
                                identity={"phase": "dense"}, phase="dense training")
            macs, params = count_complexity(copy.deepcopy(dense).cpu().float(), input_size)
            record = {"macs": macs, "params": params, "train": history, "accuracy": T.evaluate(dense, data, device=device),
                      "train_seconds": sum(r["seconds"] for r in history) if history else
                      time.perf_counter() - t0, "done": True}
            if lead:
                atomic_save(dense.state_dict(), dense_path)
            results["models"]["dense"] = record
            save_results()
        say(f"dense: {results['models']['dense']['accuracy']:.2f}%")
        finals["dense"] = dense
        check_signal(stop)

        # ---- control: the dense model fine-tuned with the same epochs and schedule
        rows = []
        if args.control and args.finetune_epochs > 0:
            rows.append(("dense+ft", "dense", False))
        for method in methods:
            if method != "dense":
                rows.append((method, method, False))
                if n_calibration:
                    rows.append((f"{method}+data", method, True))
        calibration = None
        for row, method, use_data in rows:
            start_path = os.path.join(out_dir, f"{row}-start.pt")
            final_path = os.path.join(out_dir, f"{row}.pt")
            record = results["models"].get(row) or {}
            def load(path, method=method):
                if method == "dense":
                    model = base().to(device)
                    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
                    return model
                return tdconv.skip_padding_taps(tdconv.load(path, base()).to(device))

            if record.get("done") and os.path.exists(final_path):
                finals[row] = load(final_path)
                continue
            if record.get("after_bn") is not None and os.path.exists(start_path):
                small = load(start_path)
            elif method == "dense":
                small = copy.deepcopy(dense)
                record = {"macs": results["models"]["dense"]["macs"], "params": results["models"]["dense"]["params"],
                          "after_decomposition": results["models"]["dense"]["accuracy"]}
                record["after_bn"] = record["after_decomposition"]
                if lead:
                    atomic_save(small.state_dict(), start_path)
                results["models"][row] = record
                save_results()
            else:
                t0 = time.perf_counter()
                options = {"n_iter_max": args.n_iter_max}
                if method in ("cp", "cp4"):
                    options["seed"] = args.seed
                    options["epc"] = args.epc
                if use_data:
                    if calibration is None:
                        calibration = calibration_images(data, n_calibration, seed=args.seed)
                    options.update(calibration=calibration, refine_steps=args.refine_steps,
                                   reestimate_bn="auto" if args.bn_recalibrate else False)
                small, report = tdconv.compress(copy.deepcopy(dense), method, args.rank, layers=parse_layers(args.layers),
                                         target_macs=args.target_macs, target_params=args.target_params,
                                         min_rank=args.min_rank, input_size=input_size, inplace=True,
                                         progress=progress and lead, **options)
                tdconv.skip_padding_taps(small.to(device))
                decompose_seconds = time.perf_counter() - t0
                record = {"macs": report.macs_after, "params": report.params_after,
                          "decompose_seconds": decompose_seconds,
                          "kernel_error": {r.name: r.rel_error for r in report.layers},
                          "layers": [dataclasses.asdict(r) for r in report.layers],
                          "ranks": {r.name: r.rank for r in report.layers},
                          "calibration": report.calibration,
                          "after_decomposition": T.evaluate(small, data, device=device)}
                if use_data:  # compress re-estimated BatchNorm where that helped on held-out calibration images
                    record["after_bn"] = record["after_decomposition"]
                elif args.bn_recalibrate:
                    T.recalibrate_batchnorm(small, data, batch_size=args.batch_size, device=device, seed=args.seed)
                    record["after_bn"] = T.evaluate(small, data, device=device)
                else:
                    record["after_bn"] = record["after_decomposition"]
                if lead:
                    tdconv.save(small, start_path, meta=meta)
                results["models"][row] = record
                save_results()
            say(f"{row}: {record['after_decomposition']:.2f}% right after decomposition, "
                f"{record['after_bn']:.2f}% with BatchNorm statistics re-estimated")
            check_signal(stop)

            def on_epoch(r, record=record):
                record["finetune"] = [x for x in record.get("finetune", []) if x["epoch"] < r["epoch"]] + [r]
                save_results()

            history = T.fit(small, data, finetune_cfg, device=device, checkpoint=os.path.join(out_dir, f"{row}.ckpt"),
                            resume=args.resume, teacher=dense if args.distill else None, log=log,
                            label=row, progress=progress, identity={"phase": row}, on_epoch=on_epoch,
                            phase=f"fine-tuning of {row}")
            record["finetune"] = history
            record["finetune_seconds"] = sum(r["seconds"] for r in history)
            record["accuracy"] = T.evaluate(small, data, device=device)
            record["done"] = True
            if lead:
                if method == "dense":
                    atomic_save(small.state_dict(), final_path)
                else:
                    tdconv.save(small, final_path, meta=meta)
            save_results()
            say(f"{row}: {record['accuracy']:.2f}% after {args.finetune_epochs} fine-tuning epoch(s)")
            finals[row] = small
            check_signal(stop)

    # ---- latency (rank 0) and reports
    results["latency_batch"] = args.latency_batch
    results["environment"] = describe_environment(device)
    if lead and args.latency_runs > 0:
        plain = {n: tdconv.skip_padding_taps(m, False) for n, m in finals.items()}
        with tdconv.nn.autotuning(True):  # each model at its fastest implementation
            lat = measure_latency(plain, (args.latency_batch, *input_size), device, runs=args.latency_runs)
        for name, ms in lat.items():
            results["models"][name]["latency_ms"] = ms
    if lead:
        save_results()
        table = _table(results)
        atomic_write_text(os.path.join(out_dir, "results.md"), table + "\n")
        print(table)
        for path in _plots(out_dir, results):
            say(f"wrote {path}")
        say(f"results in {out_dir}")
    barrier()
    return results
