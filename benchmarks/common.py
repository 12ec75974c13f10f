"""What the benchmarks share: the environment header, timing, the ResNet18 models and layer sets, tables.

Built on tdconv's public API only (``tdconv.utils`` for timing and the machine's description,
``tdconv.info`` for what was built), so that a benchmark measures what a user gets.

The benchmarks run from the repository root (``python benchmarks/NAME.py``): with tdconv installed
they use the installed package; in a checkout where it is not installed (after
``python setup.py build_ext --inplace``) they use the checkout's.
"""
from __future__ import annotations

import os
import re
import sys

try:
    import tdconv
except ImportError:  # not installed: the checkout this file belongs to
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tdconv

import torch
from torch import nn

import tdconv.info
from tdconv.utils import atomic_write_json, describe_environment, median_times, time_interleaved

__all__ = ["tdconv", "environment", "print_environment", "median_times", "time_interleaved", "timed",
           "resnet18", "SEED_LAYER", "resnet18_kernels", "print_table", "fmt_cell", "write_json"]

# ---------------------------------------------------------------------------------------------- environment
ENV_KEYS = ("tdconv", "torch", "torch_cuda", "cpu", "threads", "gpu", "device", "extension_loaded",
            "cpu_kernels", "cpu_kernels_isa", "cuda_kernels_usable")


def environment(device=None, **extra) -> dict:
    """Everything a measurement needs beside it: ``tdconv.info.collect()`` (versions, what was built,
    why anything is unavailable), ``tdconv.utils.describe_environment(device)`` (CPU model, threads,
    GPU, ``device``: what the measurement ran on), then ``extra`` (the benchmark's own settings)."""
    env = tdconv.info.collect()
    env.update(describe_environment(device))
    env.update(extra)
    return env


def print_environment(env: dict, extra_keys=()) -> None:
    """The header every benchmark prints first: one ``key value`` line per fact."""
    print("== environment ==")
    for key in ENV_KEYS + tuple(extra_keys):
        value = env.get(key)
        print(f"{key:<20} {value if value is not None else '-'}")


# ---------------------------------------------------------------------------------------------- timing
def timed(fn, device=None, repeats: int = 1):
    """``(median seconds, last result)`` of ``repeats`` timed calls of ``fn`` (no warm-up; the device
    synchronised around each call on CUDA): for runs long enough to time one call at a time."""
    out = {}

    def call():
        out["result"] = fn()

    seconds = median_times({"run": call}, rounds=repeats, warmup=0, device=device)["run"]
    return seconds, out.get("result")


# ---------------------------------------------------------------------------------------------- models
SEED_LAYER = re.compile(r"^layer\d\.\d\.conv2$")  # the seed's configuration: conv2 of every BasicBlock


def resnet18(stem: str = "imagenet", num_classes: int = 10, seed: int = 0) -> nn.Module:
    """torchvision's resnet18 with seeded random weights. ``stem="imagenet"``: torchvision's own (7x7
    stride-2 conv and max-pool; the seed's model, also on 32x32 images); ``"cifar"``: a 3x3 stride-1
    conv and no max-pool."""
    from tdconv.apps.models import build_model  # the one model builder, shared with the command line

    torch.manual_seed(seed)
    return build_model("resnet18", num_classes, stem=stem)


def resnet18_kernels(which: str = "all", device="cpu", dtype=torch.float32) -> list:
    """``[(name, weight)]`` of every ``Conv2d`` of :func:`resnet18` (``which="all"``: stem, block convs,
    1x1 downsample convs) or of the seed's 8 ``conv2`` layers (``"seed"``); weights detached, on
    ``device`` in ``dtype``."""
    layers = [(name, m.weight.detach().to(device=device, dtype=dtype))
              for name, m in resnet18().named_modules() if isinstance(m, nn.Conv2d)]
    if which == "seed":
        layers = [(n, w) for n, w in layers if SEED_LAYER.match(n)]
    elif which != "all":
        raise ValueError(f"which must be 'all' or 'seed', got {which!r}")
    return layers


# ---------------------------------------------------------------------------------------------- output
def fmt_cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def print_table(cols: list, body: list, *, right=()) -> None:
    """Print ``body`` (rows of cells; non-strings through :func:`fmt_cell`) under the headers ``cols``,
    in aligned columns; the columns whose indices are in ``right`` are right-aligned."""
    body = [[c if isinstance(c, str) else fmt_cell(c) for c in row] for row in body]
    widths = [max([len(c)] + [len(row[i]) for row in body]) for i, c in enumerate(cols)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(cols))
    print(line(["-" * w for w in widths]))
    for row in body:
        print(line(row))


def write_json(path, obj) -> None:
    """``obj`` as JSON to ``path`` (folders created), atomically."""
    atomic_write_json(path, obj)
