"""fit / evaluate / BatchNorm re-estimation; checkpoints, exact resume, signals, refusal of a mismatched resume."""
import gc
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import tdconv
from tdconv.apps import train as T
from tdconv.apps.data import load_dataset, normalize
from tdconv.apps.distributed import reduce_signal


def _data():
    return load_dataset("synthetic").subset(train=384, test=128)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         tdconv.FactorizedConv2d(8, 16, 3, 2, 1, rank=4), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10))


CFG = dict(epochs=3, batch_size=64, lr=0.2, seed=3)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_learns_and_logs(tmp_path):
    data, model = _data(), _model()
    before = T.evaluate(model, data)
    log = tmp_path / "log.jsonl"
    history = T.fit(model, data, T.TrainConfig(**CFG), checkpoint=str(tmp_path / "c.ckpt"), log=str(log),
                    progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["test_acc"] > max(before + 30, 60.0)  # chance is 10 %
    assert len(log.read_text().splitlines()) == 3
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-6)  # cosine down to zero


def _interrupt_at(model, at_call):
    """Send SIGINT to this process during the ``at_call``-th forward of ``model``."""
    calls = {"n": 0}

    def hook(module, inputs):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGINT)

    return model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("at_call", [6, 8], ids=["after-an-epoch", "mid-epoch"])
def test_interrupted_run_resumes_to_the_identical_result(tmp_path, at_call):
    # 6 batches per epoch + 1 evaluation batch: forward 6 is the epoch's last batch (the epoch finishes
    # and is saved, then the run stops), forward 8 is the first batch of epoch 2 (saved mid-epoch).
    data, cfg = _data(), T.TrainConfig(**CFG)
    reference = _model()
    ref_history = T.fit(reference, data, cfg, progress=False)

    ckpt = str(tmp_path / "run.ckpt")
    model = _model()
    handle = _interrupt_at(model, at_call)
    with pytest.raises(T.Interrupted, match=f"stopped by signal {int(signal.SIGINT)}; checkpoint saved to") as info:
        T.fit(model, data, cfg, checkpoint=ckpt, progress=False)
    handle.remove()
    assert info.value.checkpoint == ckpt and info.value.signum == signal.SIGINT
    saved = torch.load(ckpt, weights_only=True)  # tensors and plain values only
    assert (saved["epoch"], saved["batch"]) == ((1, 0) if at_call == 6 else (1, 1))

    resumed = _model()  # a new process would start from fresh weights
    history = T.fit(resumed, data, cfg, checkpoint=ckpt, resume=True, progress=False)
    assert _same(resumed, reference)
    assert [r["test_acc"] for r in history] == [r["test_acc"] for r in ref_history]
    assert [r["train_loss"] for r in history] == pytest.approx([r["train_loss"] for r in ref_history], rel=1e-9)


def test_resume_with_other_arguments_is_refused(tmp_path):
    data, ckpt = _data(), str(tmp_path / "run.ckpt")
    T.fit(_model(), data, T.TrainConfig(**dict(CFG, epochs=1)), checkpoint=ckpt, progress=False,
          identity={"dataset": "synthetic"})
    with pytest.raises(T.CheckpointMismatch, match=r"epochs: 1 -> 3; lr: 0.2 -> 0.1"):
        T.fit(_model(), data, T.TrainConfig(**dict(CFG, lr=0.1)), checkpoint=ckpt, resume=True, progress=False,
              identity={"dataset": "synthetic"})
    with pytest.raises(T.CheckpointMismatch, match="dataset: 'synthetic' -> 'other'"):
        T.fit(_model(), data, T.TrainConfig(**dict(CFG, epochs=1)), checkpoint=ckpt, resume=True, progress=False,
              identity={"dataset": "other"})
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(T.CheckpointMismatch, match="cannot read checkpoint"):
        T.fit(_model(), data, T.TrainConfig(**CFG), checkpoint=str(tmp_path / "junk.ckpt"), resume=True,
              progress=False)


class _RunsCode:
    """Unpickling it creates a folder: the stand-in of a checkpoint that runs code when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_a_checkpoint_that_carries_code_is_refused(tmp_path):
    data, cfg, ckpt = _data(), T.TrainConfig(**dict(CFG, epochs=1)), str(tmp_path / "run.ckpt")
    history = T.fit(_model(), data, cfg, checkpoint=ckpt, progress=False)
    assert T.fit(_model(), data, cfg, checkpoint=ckpt, resume=True, progress=False) == history  # plain: loads
    saved = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "the-checkpoint-ran-code"
    saved["history"].append(_RunsCode(str(marker)))
    torch.save(saved, ckpt)
    with pytest.raises(T.CheckpointMismatch, match=r"refusing to load .*run.ckpt.*could run code"):
        T.fit(_model(), data, cfg, checkpoint=ckpt, resume=True, progress=False)
    assert not marker.exists()


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    data, cfg, ckpt = _data(), T.TrainConfig(**dict(CFG, epochs=1)), tmp_path / "run.ckpt"
    T.fit(_model(), data, cfg, checkpoint=str(ckpt), progress=False)
    before = torch.load(ckpt, weights_only=True)

    def boom(obj, f):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    model = _model()
    model[0].weight.data.add_(1.0)  # another run, whose checkpoint would differ
    with pytest.raises(OSError, match="disk full"):
        T.fit(model, data, cfg, checkpoint=str(ckpt), progress=False)
    monkeypatch.undo()
    after = torch.load(ckpt, weights_only=True)
    assert torch.equal(after["model"]["0.weight"], before["model"]["0.weight"])
    assert os.listdir(tmp_path) == ["run.ckpt"]  # the old file intact, no leftovers


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data, cfg, ckpt = _data(), T.TrainConfig(**dict(CFG, epochs=2)), tmp_path / "run.ckpt"
    model, calls, after_epoch = _model(), {"n": 0}, {}

    def poison(module, inputs, output):  # forward 9: epoch 2, batch 2 (6 batches + 1 evaluation an epoch)
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 9 else None

    model.register_forward_hook(poison)
    with pytest.raises(T.Diverged, match=r"^dense training: the training loss diverged at epoch 2, step 2 of 6: it "
                                         r"became nan.*checkpoint .*run.ckpt holds the last good state \(epoch 1\)"):
        T.fit(model, data, cfg, checkpoint=str(ckpt), progress=False, phase="dense training",
              on_epoch=lambda r: after_epoch.update(torch.load(ckpt, weights_only=True)["model"]))
    saved = torch.load(ckpt, weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 0)
    assert all(torch.equal(saved["model"][k], after_epoch[k]) for k in after_epoch)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the poisoned step was not taken


def test_an_exploding_loss_stops_training(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(T.Diverged, match=r"^train: the training loss diverged at epoch 1, step \d of 6: it stayed "
                                         r"above .* for \d steps.*no checkpoint was written.*The learning rate "
                                         r"\(lr=10000.0\) defines the run"):
        T.fit(_model(), _data(), T.TrainConfig(**dict(CFG, lr=1e4)), checkpoint=str(ckpt), progress=False)
    assert not ckpt.exists()  # the first epoch ended exploding: its weights are not saved


class _Shifted(nn.Module):
    """A teacher that answers class c + 1 (mod 10) wherever its model answers c."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).roll(1, dims=1)


def test_distillation_pulls_the_student_toward_the_teacher():
    data = _data()
    trained = _model()
    T.fit(trained, data, T.TrainConfig(**CFG), progress=False)
    teacher = _Shifted(trained)
    student = _model()
    # distill=1: no cross-entropy with the labels at all, only the teacher's answers
    T.fit(student, data, T.TrainConfig(**dict(CFG, distill=1.0)), teacher=teacher, progress=False)
    x = normalize(data.x_test, data.mean, data.std)
    with torch.no_grad():
        answers, taught = teacher.eval()(x).argmax(1), student.eval()(x).argmax(1)
    agreement = (answers == taught).float().mean().item()
    assert agreement > 0.5, agreement  # chance is 0.1; a student that learnt the labels would agree ~never
    assert (taught == data.y_test).float().mean().item() < 0.3  # and it did not learn the labels


def test_bad_config():
    data = _data()
    with pytest.raises(ValueError, match="needs a teacher"):
        T.fit(_model(), data, T.TrainConfig(distill=0.5), progress=False)
    for bad, match in [({"lr": -1.0}, "lr must be a finite number"), ({"schedule": "step"}, "schedule must be"),
                       ({"batch_size": 1}, "batch_size must be"), ({"seed": -1}, "seed must be"),
                       ({"distill": 2.0}, "distill must be in")]:
        with pytest.raises(ValueError, match=match):
            T.TrainConfig(**bad)
    with pytest.raises(ValueError, match="no full batch"):
        T.fit(_model(), data, T.TrainConfig(batch_size=1024), progress=False)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        T.fit(_model(), data, T.TrainConfig(), resume=True, progress=False)


def test_batchnorm_recalibration_matches_the_data():
    data = _data()
    model = _model()
    model[1].running_mean.fill_(100.0)  # stale statistics, as after a decomposition
    T.recalibrate_batchnorm(model, data, batches=3, batch_size=128)
    assert model[1].momentum == 0.1 and model.training
    x = normalize(data.x_train, data.mean, data.std)
    with torch.no_grad():
        y = model[0](x)
    assert torch.allclose(model[1].running_mean, y.mean((0, 2, 3)), atol=0.05)


# ------------------------------------------------------------------------------ two processes (Gloo)
def _in_group(rank, world, store, fn, args):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
        # Whatever fn built over the group (a DDP reducer and its threads) goes before the group does, and
        # both processes leave together: tearing the group down under a live reducer can abort the process.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_two_processes(tmp_path, fn, *args):
    mp.spawn(_in_group, args=(2, str(tmp_path / "store"), fn, args), nprocs=2)


def _signal_worker(rank, out, cases):
    got = [reduce_signal(case[rank], "cpu") for case in cases]
    torch.save(got, os.path.join(out, f"signals{rank}.pt"))


def test_the_signal_all_processes_act_on_is_the_one_received(tmp_path):
    term, stop = int(signal.SIGTERM), int(signal.SIGINT)
    cases = [(term, term), (0, term), (stop, 0), (0, 0), (stop, stop)]
    _run_two_processes(tmp_path, _signal_worker, str(tmp_path), cases)
    for rank in range(2):  # a signal, not the sum of two (SIGTERM twice is not "signal 30")
        assert torch.load(tmp_path / f"signals{rank}.pt") == [term, term, stop, 0, stop]
    assert reduce_signal(term, "cpu") == term  # one process: as it is


def _model_without_batchnorm():
    """BatchNorm would normalise each process's half batch on its own, one process the whole batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), tdconv.FactorizedConv2d(8, 16, 3, 2, 1, rank=4),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10))


# one step: 64 images, a global batch of 64 (2 x 32 under two processes); no augmentation, whose
# choices depend on the process
ONE_STEP = dict(epochs=1, lr=0.2, seed=3, augment=False)


def _one_step_data():
    return load_dataset("synthetic").subset(train=64, test=64)


def _ddp_worker(rank, out):
    model = _model_without_batchnorm()
    T.fit(model, _one_step_data(), T.TrainConfig(batch_size=32, **ONE_STEP), progress=False)
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))


def test_two_processes_take_the_step_that_one_process_takes(tmp_path):
    _run_two_processes(tmp_path, _ddp_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # the replicas stay identical
    single = _model_without_batchnorm()
    start = {k: v.clone() for k, v in single.state_dict().items()}
    T.fit(single, _one_step_data(), T.TrainConfig(batch_size=64, **ONE_STEP), progress=False)
    for k, v in single.state_dict().items():
        assert not torch.equal(v, start[k]), k  # the step moved every parameter
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-6, msg=k)
