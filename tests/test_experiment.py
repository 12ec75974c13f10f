"""`tdconv experiment` end to end: real data, the files it writes, exact resume after a kill, 2-process DDP,
and bad input."""
import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import tdconv
from tdconv.apps.data import DEBIAN_FASHION_MNIST, load_dataset
from tdconv.apps.models import build_model
from tdconv.apps.train import evaluate
from tdconv.cli import main

# On the CPU (also on GPU machines): exact resume is a CPU guarantee, and the 2-process run uses Gloo.
FAST = ["--n-iter-max", "10", "--latency-runs", "2", "--latency-batch", "16", "--quiet", "--device", "cpu"]
SYNTHETIC = ["--dataset", "synthetic", "--train-subset", "512", "--test-subset", "256", "--batch-size", "64",
             "--methods", "dense,cp", "--epochs", "2", "--finetune-epochs", "2", "--lr", "0.05", "--calibration", "128",
             *FAST]


def _results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_end_to_end(tmp_path):
    """Real data: the dense model learns, fine-tuning changes the compressed models and recovers accuracy."""
    rc = main(["experiment", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "data"),
               "--train-subset", "4000", "--test-subset", "1000", "--batch-size", "128", "--epochs", "2",
               "--finetune-epochs", "1", "--calibration", "256", "--out", str(tmp_path), "--name", "fm", *FAST])
    assert rc == 0
    run = tmp_path / "fm"
    for name in ("results.md", "results.json", "log.jsonl", "accuracy_vs_epoch.png", "dense.pt", "cp.pt", "tucker.pt"):
        assert (run / name).stat().st_size > 0, name
    assert (tmp_path / "accuracy_vs_macs.png").stat().st_size > 0
    res = _results(run)
    models = res["models"]
    assert res["input_size"] == [1, 28, 28]
    assert models["dense"]["accuracy"] > 60  # chance is 10 %
    for method in ("cp", "tucker"):
        m = models[method]
        assert m["macs"] < models["dense"]["macs"] and m["params"] < models["dense"]["params"]
        assert m["accuracy"] > m["after_decomposition"], method
        assert len(m["finetune"]) == 1 and m["latency_ms"] > 0
        start = tdconv.serialization.read(run / f"{method}-start.pt")["state_dict"]
        end = tdconv.serialization.read(run / f"{method}.pt")["state_dict"]
        changed = [k for k in start if k.endswith(".first") and not torch.equal(start[k], end[k])]
        assert len(changed) == 8, f"{method}: fine-tuning must update every factorised layer"
    table = (run / "results.md").read_text()
    assert "| dense |" in table and "| cp |" in table and "| tucker |" in table and "fine-tune ep 1" in table
    assert len((run / "log.jsonl").read_text().splitlines()) == 2 + 5  # dense; dense+ft, cp(+data), tucker(+data)
    assert models["tucker+data"]["calibration"]["images"] == 224 and len(models["dense+ft"]["finetune"]) == 1


def _cli(*args, env=None):
    return [sys.executable, "-m", "tdconv", "experiment", *args]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    subprocess.run(_cli(*SYNTHETIC, "--out", str(out), "--name", "ref"), check=True, timeout=600)
    return out / "ref"


def _comparable(results):
    """results.json without wall times."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if not (k.endswith("seconds") or k in ("images_per_s", "latency_ms", "environment"))}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(results)


# The command line, with SIGTERM sent to itself right after optimiser step STOP_AT_STEP of the run.
STOP_AT_STEP = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
from tdconv.apps.models import build_model
from tdconv.apps.train import evaluate
from tdconv.cli import main
steps = [0]
def hook(optimizer, args, kwargs):
    steps[0] += 1
    if steps[0] == int(os.environ["STOP_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGTERM)
register_optimizer_step_post_hook(hook)
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_identical_result(uninterrupted, tmp_path):
    args = ["experiment", *SYNTHETIC, "--out", str(tmp_path), "--name", "ref"]
    # 512 images / batch 64 = 8 steps an epoch: step 10 is the second step of dense epoch 2
    env = dict(os.environ, STOP_AT_STEP="10")
    proc = subprocess.run([sys.executable, "-c", STOP_AT_STEP, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert f"interrupted by signal {int(signal.SIGTERM)}" in proc.stderr and "--resume" in proc.stderr
    assert not (tmp_path / "ref" / "dense.pt").exists()  # it stopped before the end of dense training
    saved = torch.load(tmp_path / "ref" / "dense.ckpt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 2)
    # the same folder without --resume: refused, nothing lost
    again = subprocess.run(_cli(*args[1:]), capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already holds a run; pass --resume" in again.stderr
    subprocess.run(_cli(*args[1:], "--resume"), check=True, timeout=600)
    assert _comparable(_results(tmp_path / "ref")) == _comparable(_results(uninterrupted))
    a = tdconv.serialization.read(tmp_path / "ref" / "cp.pt")["state_dict"]
    b = tdconv.serialization.read(uninterrupted / "cp.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_data_aware_and_control_rows(uninterrupted):
    """Next to each kernel-fitted row a data-aware one (128 training images, 1/8 held out), and the
    control: the dense model fine-tuned with the same schedule."""
    models = _results(uninterrupted)["models"]
    assert list(models) == ["dense", "dense+ft", "cp", "cp+data"]
    data_row = models["cp+data"]
    c = data_row["calibration"]
    assert (c["images"], c["held_out_images"], c["sequential"]) == (112, 16, True)
    assert all(layer["fit"] in ("data", "kernel (better on the calibration or held-out images)")
               for layer in data_row["layers"])
    assert all(layer["output_error"] <= layer["kernel_fit_output_error"] for layer in data_row["layers"])
    assert data_row["ranks"] == models["cp"]["ranks"] and data_row["macs"] == models["cp"]["macs"]
    control = models["dense+ft"]
    assert control["macs"] == models["dense"]["macs"] and len(control["finetune"]) == 2
    assert control["after_decomposition"] == models["dense"]["accuracy"]
    before = torch.load(uninterrupted / "dense.pt", weights_only=True)
    after = torch.load(uninterrupted / "dense+ft.pt", weights_only=True)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    table = (uninterrupted / "results.md").read_text()
    assert "| cp+data |" in table and "| dense+ft |" in table and "dense+ft: the control" in table
    assert "cp+data: data-aware fits on 112 calibration images (16 more held out), sequential" in table


def test_resume_with_other_arguments_names_them(uninterrupted, capsys):
    args = [a if a != "0.05" else "0.2" for a in SYNTHETIC] + ["--out", str(uninterrupted.parent), "--name", "ref"]
    with pytest.raises(SystemExit, match=r"refusing to resume.*lr: 0.05 -> 0.2"):
        main(["experiment", *args, "--resume"])
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):
        main(["experiment", *args])
    # An argument added after the run started counts as its default: absent == default, not a difference.
    saved = json.loads((uninterrupted / "args.json").read_text())
    del saved["epc"]
    (uninterrupted / "args.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"Differences \(saved -> now\): lr: 0.05 -> 0.2$"):
        main(["experiment", *args, "--resume"])


def test_ddp_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "tdconv", "experiment", *SYNTHETIC, "--epochs", "1", "--finetune-epochs", "1",
           "--out", str(tmp_path), "--name", "ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    res = _results(run)
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines] == ["dense", "dense+ft", "cp", "cp+data"]  # written by rank 0 only
    assert "| cp |" in proc.stdout
    # The accuracies the two processes reported (each evaluated half the test set, then summed) are
    # those of the saved models evaluated whole in one process, to within one image of rounding.
    data = load_dataset("synthetic").subset(512, 256, seed=0)
    dense = build_model("resnet18", 10)
    dense.load_state_dict(torch.load(run / "dense.pt", weights_only=True))
    cp = tdconv.load(run / "cp.pt", build_model("resnet18", 10))
    cp_data = tdconv.load(run / "cp+data.pt", build_model("resnet18", 10))  # both processes fitted the same
    for name, model in (("dense", dense), ("cp", cp), ("cp+data", cp_data)):
        assert abs(evaluate(model, data) - res["models"][name]["accuracy"]) <= 100 / 256 + 1e-9, name


@pytest.mark.parametrize("args, match", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "npz:/nonexistent/folder"], "train.npz does not exist"),
    (["--model", "vgg11"], "model must be a torchvision ResNet"),
    (["--methods", "dense,svd"], "--methods must be a comma-separated subset"),
    (["--finetune-lr", "-1"], "lr must be a finite number >= 0"),
    (["--latency-batch", "0"], "--latency-batch must be >= 1"),
    (["--calibration", "-1"], "--calibration and --refine-steps must be >= 0"),
    (["--calibration", "600"], "--calibration 600 is more than the 512 training images"),
    # compression arguments are checked before the dense phase, not after it
    (["--rank", "0"], r"compression arguments do not fit resnet18 \(method cp\).*rank must be a positive integer"),
    (["--layers", "nope"], r"does not have: \['nope'\]"),
    (["--min-rank", "2"], r"min_rank must be a fraction"),
])
def test_bad_input(tmp_path, args, match):
    with pytest.raises(SystemExit, match=match):
        main(["experiment", *SYNTHETIC, "--out", str(tmp_path), *args])
    assert not os.listdir(tmp_path)  # nothing started


def test_experiment_scopes_autotuning_and_restores_it_on_errors(tmp_path, monkeypatch):
    """The experiment turns autotuning off for training only through ``tdconv.nn.autotuning``, which
    gives the caller's setting back also when the run stops with an error; never globally."""
    events = []

    @contextlib.contextmanager
    def autotuning(enabled):
        events.append(("enter", enabled))
        try:
            yield
        finally:
            events.append(("exit", enabled))

    def set_autotune(enabled):
        raise AssertionError(f"the experiment set autotuning globally to {enabled}")

    monkeypatch.setattr(tdconv.nn, "autotuning", autotuning, raising=False)
    monkeypatch.setattr(tdconv.nn, "set_autotune", set_autotune)
    monkeypatch.setattr(tdconv, "set_autotune", set_autotune)
    with pytest.raises(SystemExit, match="--weights .*missing.pt' does not exist"):
        main(["experiment", *SYNTHETIC, "--weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    assert events == [("enter", False), ("exit", False)]


def test_report_rebuilds_the_models_the_experiment_wrote(tmp_path, capsys):
    """The files of a run carry what rebuilding their model needs: class count, stem, input channels."""
    assert main(["experiment", "--dataset", "synthetic", "--train-subset", "128", "--test-subset", "64",
                 "--batch-size", "64", "--methods", "dense,cp", "--epochs", "0", "--finetune-epochs", "0",
                 "--stem", "cifar", "--n-iter-max", "2", "--latency-runs", "0", "--quiet", "--device", "cpu",
                 "--out", str(tmp_path), "--name", "r"]) == 0
    macs = _results(tmp_path / "r")["models"]["cp"]["macs"]
    for name in ("cp-start.pt", "cp.pt"):
        capsys.readouterr()
        assert main(["report", str(tmp_path / "r" / name)]) == 0
        assert f"rebuilt resnet18 from the file: {macs / 1e6:.2f} MMac" in capsys.readouterr().out, name


def test_a_diverging_run_stops_with_an_error_naming_the_phase_and_step(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: dense training: the training loss diverged at epoch 1, step \d of "
                                         r"8: .*\(lr=10000.0\) defines the run, so a lower one is a new run"):
        main(["experiment", *SYNTHETIC, "--lr", "1e4", "--out", str(tmp_path), "--name", "dense"])
    assert not (tmp_path / "dense" / "dense.pt").exists() and not (tmp_path / "dense" / "results.json").exists()
    # fine-tuning, from given dense weights
    weights = tmp_path / "weights.pt"
    torch.save(build_model("resnet18", 10).state_dict(), weights)
    with pytest.raises(SystemExit, match=r"^error: fine-tuning of cp: the training loss diverged at epoch 1, step "
                                         r"\d of 8: .*\(lr=10000.0\)"):
        main(["experiment", *SYNTHETIC, "--weights", str(weights), "--finetune-lr", "1e4", "--no-control", "--out",
              str(tmp_path), "--name", "cp"])
    assert not (tmp_path / "cp" / "cp.pt").exists() and (tmp_path / "cp" / "cp-start.pt").exists()
