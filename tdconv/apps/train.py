"""Training, fine-tuning and evaluation, with checkpoints that never lose work and data parallelism.

:func:`fit` trains a model on an :class:`~tdconv.apps.data.ImageDataset` with SGD (momentum, Nesterov),
weight decay, a warm-up + cosine (or one-cycle) schedule, label smoothing and, optionally,
knowledge distillation from a teacher. It writes an atomic checkpoint after every epoch, and on
SIGINT / SIGTERM after the step in flight; ``resume=True`` continues from the checkpoint, to exactly
the result an uninterrupted run gives (same seed, same device and thread count).

Under ``torchrun`` (``WORLD_SIZE > 1``), :func:`tdconv.apps.distributed.init_distributed` starts the
process group (NCCL on GPUs, Gloo on CPU); :func:`fit` then wraps the model in
DistributedDataParallel, each process takes its shard of every epoch's permutation, metrics are
summed over processes and only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageDataset, augment, batch_seed, epoch_order, normalize
from .distributed import all_max, all_mean_, all_sum, barrier, rank_and_world, reduce_signal
from .signals import Interrupted, stop_on_signals
from ..utils import atomic_save

__all__ = ["TrainConfig", "fit", "evaluate", "recalibrate_batchnorm", "Interrupted", "Diverged", "CheckpointMismatch",
           "stop_on_signals", "config_differences"]


class Diverged(FloatingPointError):
    """Training stopped because its loss became non-finite or exploded (see :class:`_DivergenceGuard`).
    The weights of the diverged steps are not saved: ``checkpoint``, if any, holds the last good state."""

    def __init__(self, message: str, epoch: int, step: int, checkpoint: str | None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


class CheckpointMismatch(ValueError):
    """A checkpoint that a run cannot resume from: made with other arguments, unreadable, or holding
    more than tensors and plain values (which could run code when loaded)."""


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit`. The defaults train the seed's ResNet18 on CIFAR-10 from scratch."""
    epochs: int = 15
    batch_size: int = 256
    lr: float = 0.1                 # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4      # not applied to biases and BatchNorm parameters
    schedule: str = "cosine"        # "cosine" (linear warm-up, cosine to 0), "onecycle", "constant"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    augment: bool = True            # random crop (padding 4) + horizontal flip
    distill: float = 0.0            # weight of the distillation loss (needs a teacher); 0 turns it off
    temperature: float = 4.0
    seed: int = 0

    def __post_init__(self):
        def need(ok, name, expected):
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        need(isinstance(self.epochs, int) and self.epochs >= 0, "epochs", "an int >= 0")
        need(isinstance(self.batch_size, int) and self.batch_size >= 2, "batch_size", "an int >= 2")
        for name in ("lr", "weight_decay", "warmup_epochs"):
            need(isinstance(getattr(self, name), (int, float)) and math.isfinite(getattr(self, name))
                 and getattr(self, name) >= 0, name, "a finite number >= 0")
        need(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)")
        need(0 <= self.distill <= 1, "distill", "in [0, 1]")
        need(self.temperature > 0, "temperature", "> 0")
        need(self.schedule in ("cosine", "onecycle", "constant"), "schedule", "'cosine', 'onecycle' or 'constant'")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an int >= 0")


def config_differences(saved: dict, current: dict) -> list:
    """``["name: saved -> current", ...]`` for every argument that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]


# ------------------------------------------------------------------------------------------- evaluation
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _autocast(device):
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, *, batch_size: int = 512, split: str = "test",
             device=None) -> float:
    """Top-1 accuracy in percent on ``split`` ("test" or "train"), summed over all processes."""
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    device = device or next(model.parameters()).device
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)
    rank, world = rank_and_world()
    idx = torch.arange(rank, len(y), world)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size].to(x.device)
            with _autocast(device):
                out = model(normalize(x[b].to(device), data.mean, data.std))
            correct += int((out.argmax(1) == y[b].to(device)).sum())
    finally:
        model.train(was_training)
    correct, count = all_sum([correct, len(idx)], device)
    return 100.0 * correct / count


def _batchnorms(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: ImageDataset, *, batches: int = 40, batch_size: int = 256,
                          device=None, seed: int = 0) -> None:
    """Re-estimate every BatchNorm's running mean and variance on training images (no weight changes):
    after a decomposition the layers' outputs are slightly different, and stale statistics cost far
    more accuracy than the approximation itself. Averaged over processes under torchrun."""
    bns = _batchnorms(model)
    if not bns:
        return
    device = device or next(model.parameters()).device
    rank, world = rank_and_world()
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    was_training = model.training
    model.train()
    try:
        order = epoch_order(len(data.y_train), seed, -2, rank, world, pad=True)
        for i in range(min(batches, max(1, len(order) // batch_size))):
            b = order[i * batch_size:(i + 1) * batch_size].to(data.x_train.device)
            with _autocast(device):
                model(normalize(data.x_train[b].to(device), data.mean, data.std))
    finally:
        model.train(was_training)
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    if world > 1:
        all_mean_([t for m in bns for t in (m.running_mean, m.running_var)], world)


# ------------------------------------------------------------------------------------------------ fit
def _param_groups(model: nn.Module, weight_decay: float) -> list:
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            no = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) or name == "bias"
            (no_decay if no else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    warm = min(total, int(round(config.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if config.schedule == "onecycle":  # linear up over 30 % of the run, cosine down to 1/1000
            up = max(1, int(0.3 * total))
            if step < up:
                return 0.04 + 0.96 * step / up
            t = min(1.0, (step - up) / max(1, total - up))
            return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * t))
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * t))

    return factor


class _Progress:
    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled = enabled and rank_and_world()[0] == 0
        self.label, self.total, self.t0, self.last = label, total, time.perf_counter(), 0.0

    def update(self, done: int, loss: float, acc: float, images: int, final: bool = False):
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < 0.5):
            return
        self.last = now
        elapsed = now - self.t0
        rate = images / elapsed if elapsed > 0 else 0.0
        eta = elapsed / max(done, 1) * (self.total - done)
        width = 24
        bar = "#" * int(width * done / max(self.total, 1))
        line = (f"\r{self.label} [{bar:<{width}}] {done}/{self.total} loss {loss:.3f} acc {acc:5.1f}% "
                f"{rate:6.0f} img/s {'' if final else f'eta {eta:4.0f}s'}")
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()


class _DivergenceGuard:
    """Watches the training loss. Diverged: a non-finite loss, or one above ``FACTOR`` times the larger
    of the run's first loss and log(classes) (the loss of a uniform guess) for ``STEPS`` steps in a
    row, or at the end of an epoch (whose checkpoint would keep those weights), or non-finite weights.
    Healthy training never comes near that bound; a learning rate far too high passes it within a few
    steps and never comes back. Every process takes the same decision."""
    FACTOR = 10.0
    STEPS = 5

    def __init__(self, device, world: int, initial: float | None = None, streak: int = 0):
        self.device, self.world, self.initial, self.streak = device, world, initial, streak
        self.last = None  # the loss last checked

    def bound(self, classes: int) -> float:
        return self.FACTOR * max(self.initial, math.log(max(classes, 2)))

    def check(self, loss: torch.Tensor, classes: int) -> str | None:
        """Before the step: why the loss has diverged, or None."""
        value = self.last = float(loss.detach())
        if self.initial is None:  # the first step of the run, on every process at once
            self.initial = all_sum([value], self.device)[0] / self.world
        flag = 2 if not (math.isfinite(value) and math.isfinite(self.initial)) else int(value > self.bound(classes))
        if self.world > 1:
            flag = int(all_max([flag], self.device)[0])
        if flag == 2:
            return f"it became {value}" if not math.isfinite(value) else "it became non-finite on another process"
        self.streak = self.streak + 1 if flag else 0
        if self.streak >= self.STEPS:
            return (f"it stayed above {self.bound(classes):.3g} ({self.FACTOR:g} x the larger of the first loss "
                    f"{self.initial:.3g} and log(classes)) for {self.streak} steps, reaching {value:.3g}")
        return None

    def at_epoch_end(self, model: nn.Module, classes: int) -> str | None:
        """Before the epoch's checkpoint: why these weights must not be saved, or None."""
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return "the weights became non-finite"
        if self.streak:
            return f"the epoch ended with the loss above {self.bound(classes):.3g} for {self.streak} step(s)"
        return None


def _read_checkpoint(path: str, config: TrainConfig, identity: dict | None) -> dict:
    try:  # tensors and plain values only: a checkpoint never runs code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        if found:  # torch names the callable or class it refused
            raise CheckpointMismatch(f"cannot read checkpoint {path!r}: refusing to load {path!r}: it holds objects "
                                     f"other than tensors and plain values, and loading them could run code "
                                     f"({found[0]}). Delete it to start the run afresh") from None
        raise CheckpointMismatch(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise CheckpointMismatch(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "tdconv-train/1":
        raise CheckpointMismatch(f"{path!r} is not a tdconv training checkpoint")
    saved = dict(ckpt["config"], **(ckpt.get("identity") or {}))
    current = dict(dataclasses.asdict(config), **(identity or {}))
    diffs = config_differences(saved, current)
    if diffs:
        raise CheckpointMismatch(f"checkpoint {path!r} was made with other arguments; refusing to resume. "
                                 f"Differences (checkpoint -> now): {'; '.join(diffs)}")
    return ckpt


def fit(model: nn.Module, data: ImageDataset, config: TrainConfig | None = None, *, device=None,
        checkpoint: str | None = None, resume: bool = False, teacher: nn.Module | None = None,
        log: str | None = None, label: str = "train", progress: bool = True, identity: dict | None = None,
        on_epoch=None, phase: str | None = None) -> list:
    """Train ``model`` in place for ``config.epochs`` epochs; returns the history (one dict per epoch:
    ``epoch, train_loss, train_acc, test_acc, lr, seconds, images_per_s``).

    A fresh optimiser is built over ``model``'s own parameters. ``checkpoint``: written atomically after
    every epoch and when SIGINT / SIGTERM arrive (then :class:`Interrupted` is raised). ``resume``:
    continue from ``checkpoint`` when it exists; a checkpoint made with another ``config`` or
    ``identity`` (extra arguments that define the run, e.g. the data set) raises
    :class:`CheckpointMismatch` naming the differences. ``teacher`` with ``config.distill > 0``: the
    loss adds ``distill * T^2 * KL(teacher || student)`` at temperature T. ``log``: JSON lines, one
    per epoch. ``on_epoch(record)`` is called after each epoch on every process. A diverging run
    (non-finite or exploding loss, see :class:`_DivergenceGuard`) raises :class:`Diverged` without
    saving the diverged weights; its message names ``phase`` (default: ``label``), epoch and step.
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.distill > 0 and teacher is None:
        raise ValueError(f"TrainConfig.distill={config.distill} needs a teacher model")
    if resume and not checkpoint:
        raise ValueError("resume=True needs a checkpoint path")
    device = torch.device(device or next(model.parameters()).device)
    rank, world = rank_and_world()
    model.to(device=device, memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device=device, memory_format=torch.channels_last).eval()
    n_local = len(epoch_order(len(data.y_train), config.seed, 0, rank, world))
    steps = n_local // config.batch_size
    if steps == 0:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {n_local} training images of each "
                         f"process: no full batch")
    optimizer = torch.optim.SGD(_param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, steps))
    history, start_epoch, start_batch, running = [], 0, 0, [0.0, 0.0, 0.0]
    guard, saved_at = _DivergenceGuard(device, world), None
    if resume and os.path.exists(checkpoint):
        ckpt = _read_checkpoint(checkpoint, config, identity)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, start_epoch, start_batch = ckpt["history"], ckpt["epoch"], ckpt["batch"]
        running = ckpt["running"]
        guard = _DivergenceGuard(device, world, ckpt.get("initial_loss"), ckpt.get("streak", 0))
        saved_at = (start_epoch, start_batch)
        if rank == 0 and progress:
            where = f"epoch {start_epoch + 1}, batch {start_batch}" if start_batch else f"epoch {start_epoch + 1}"
            print(f"{label}: resuming from {checkpoint} at {where}", file=sys.stderr)
    net = model
    if world > 1:
        # Each process keeps the BatchNorm statistics of its own shard (no broadcast of rank 0's buffers at
        # every forward); they are averaged at the end of every epoch.
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)

    def save(epoch, batch, run):
        nonlocal saved_at
        if checkpoint and rank == 0:
            atomic_save({"format": "tdconv-train/1", "config": dataclasses.asdict(config), "identity": identity or {},
                         "epoch": epoch, "batch": batch, "running": run, "history": history,
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "initial_loss": guard.initial,
                         "streak": guard.streak}, checkpoint)
        saved_at = (epoch, batch) if checkpoint else None
        barrier()

    def diverged(epoch, step, why):
        where = None if saved_at is None else f"epoch {saved_at[0]}" if not saved_at[1] else \
            f"epoch {saved_at[0] + 1}, batch {saved_at[1]}"
        kept = f"the checkpoint {checkpoint} holds the last good state ({where})" if where else \
            "no checkpoint was written"
        return Diverged(f"{phase or label}: the training loss diverged at epoch {epoch + 1}, step {step} of {steps}: "
                        f"{why}. Training stopped without saving these weights: {kept}. The learning rate "
                        f"(lr={config.lr}) defines the run, so a lower one is a new run (another --name, or another "
                        f"output folder; --weights reuses a dense model already trained)", epoch + 1, step, checkpoint if where else None)

    with stop_on_signals() as stop:
        for epoch in range(start_epoch, config.epochs):
            net.train()
            order = epoch_order(len(data.y_train), config.seed, epoch, rank, world)
            first = start_batch if epoch == start_epoch else 0
            loss_sum, correct, count = running if epoch == start_epoch and first else (0.0, 0.0, 0.0)
            bar = _Progress(progress, f"{label} epoch {epoch + 1}/{config.epochs}", steps)
            t0 = time.perf_counter()
            for b in range(first, steps):
                idx = order[b * config.batch_size:(b + 1) * config.batch_size].to(data.x_train.device)
                xb = data.x_train[idx]
                if config.augment:
                    xb = augment(xb, batch_seed(config.seed, epoch, b, rank))
                xb = normalize(xb.to(device), data.mean, data.std)
                yb = data.y_train[idx].to(device)
                with _autocast(device):
                    out = net(xb)
                    loss = F.cross_entropy(out.float(), yb, label_smoothing=config.label_smoothing)
                    if config.distill > 0:
                        with torch.no_grad():
                            target = F.log_softmax(teacher(xb).float() / config.temperature, 1)
                        kd = F.kl_div(F.log_softmax(out.float() / config.temperature, 1), target, log_target=True,
                                      reduction="batchmean") * config.temperature ** 2
                        loss = (1 - config.distill) * loss + config.distill * kd
                why = guard.check(loss, data.num_classes)
                if why:  # before the step: the weights stay those of the last step that was fine
                    raise diverged(epoch, b + 1, why)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += guard.last * len(yb)
                correct += float((out.argmax(1) == yb).sum())
                count += len(yb)
                bar.update(b + 1, loss_sum / count, 100 * correct / count, count)
                signum = stop["signum"]
                if world > 1:
                    signum = reduce_signal(signum, device)
                if signum and b + 1 < steps:  # at the last batch, finish the epoch (evaluate, save) first
                    save(epoch, b + 1, [loss_sum, correct, count])
                    raise Interrupted(signum, checkpoint)
            seconds = time.perf_counter() - t0
            why = guard.at_epoch_end(model, data.num_classes)
            if why:
                raise diverged(epoch, steps, why)
            if world > 1:  # each process's BatchNorm statistics saw only its shard: evaluate and save one model
                with torch.no_grad():
                    all_mean_([t for m in _batchnorms(model) for t in (m.running_mean, m.running_var)], world)
            loss_sum, correct, count = all_sum([loss_sum, correct, count], device)
            bar.update(steps, loss_sum / count, 100 * correct / count, count, final=True)
            record = {"phase": label, "epoch": epoch + 1, "train_loss": loss_sum / count,
                      "train_acc": 100 * correct / count, "test_acc": evaluate(model, data, device=device),
                      "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                      "images_per_s": count / seconds if seconds > 0 else 0.0}
            history.append(record)
            if rank == 0 and log:
                with open(log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            save(epoch + 1, 0, [0.0, 0.0, 0.0])
            if on_epoch is not None:
                on_epoch(record)
            signum = stop["signum"]
            if world > 1:
                signum = reduce_signal(signum, device)
            if signum and epoch + 1 < config.epochs:
                raise Interrupted(signum, checkpoint)
    return history
