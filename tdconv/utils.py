"""Small helpers that the library, the applications and the benchmarks share.

One of each: the output size and the MACs of a convolution (as ptflops counts them), timing candidates
in interleaved rounds, a description of the machine, and atomic file writes. This module imports
nothing else of tdconv, so anything may use it.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["conv_output_size", "conv_macs", "time_interleaved", "median_times", "describe_environment",
           "atomic_save", "atomic_write_text", "atomic_write_json", "is_tracing"]


# ---------------------------------------------------------------------------------------------- conv arithmetic
def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def conv_output_size(size: Sequence[int], kernel_size, stride=1, padding=0, dilation=1) -> tuple:
    """``(Ho, Wo)`` of a 2-D convolution of an input of spatial ``size`` ``(H, W)``.

    ``padding`` is an int, a pair ``(ph, pw)`` of symmetric paddings, or a pair of ``(before, after)``
    pairs for asymmetric padding, as in ``((top, bottom), (left, right))``.
    """
    pads = [(p, p) if not isinstance(p, (tuple, list)) else tuple(p) for p in _pair(padding)]
    return tuple((n + before + after - d * (k - 1) - 1) // s + 1
                 for n, (before, after), k, s, d in zip(size, pads, _pair(kernel_size), _pair(stride),
                                                       _pair(dilation)))


def conv_macs(in_channels: int, out_channels: int, kernel_size, out_size: Sequence[int], *, groups: int = 1,
              bias: bool = False) -> int:
    """Multiply-accumulates of one image through a convolution, as ptflops counts them: every output
    element costs ``kh * kw * in_channels / groups``, plus one per output element for the bias."""
    kh, kw = _pair(kernel_size)
    pixels = int(out_size[0]) * int(out_size[1])
    macs = out_channels * pixels * (in_channels // groups) * kh * kw
    return int(macs + (out_channels * pixels if bias else 0))


# ---------------------------------------------------------------------------------------------- timing
def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(candidates: Mapping[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 1,
                     min_time: float | None = None, device=None,
                     clock: Callable[[], float] = time.perf_counter) -> dict:
    """Seconds per call of each candidate, in every round: ``{name: [seconds, ...]}``.

    Each round times every candidate once in turn, so that a slow phase of a noisy machine hits all of
    them alike (ratios measured this way are far steadier than those of back-to-back runs). Each
    candidate is first called ``warmup`` times untimed. With ``min_time`` (seconds), a candidate is
    repeated within each timed call often enough that the ``rounds`` rounds take about ``min_time``
    for it, and the time per call is reported. On CUDA (``device``), the device is synchronised
    around every timed call. ``clock`` is the stopwatch (``time.perf_counter``).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    reps = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        reps[name] = 1
        if min_time is not None:
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            reps[name] = max(1, int(min_time / rounds / max(clock() - t0, 1e-6)))
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            _sync(device)
            t0 = clock()
            for _ in range(reps[name]):
                fn()
            _sync(device)
            times[name].append((clock() - t0) / reps[name])
    return times


def median_times(candidates: Mapping[str, Callable[[], object]], **kwargs) -> dict:
    """``{name: median seconds per call}`` of :func:`time_interleaved`."""
    return {name: statistics.median(t) for name, t in time_interleaved(candidates, **kwargs).items()}


# ---------------------------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device=None) -> dict:
    """The facts a measurement needs beside it: versions, CPU model, thread count and, on CUDA, the GPU.
    ``device`` names the device of the measurement (``"device"`` in the result says what it is)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cpu": _cpu_model(), "threads": torch.get_num_threads()}
    if dev.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["device"] = env["gpu"]
    else:
        env["device"] = f"{env['cpu']}, {env['threads']} threads"
    return env


# ---------------------------------------------------------------------------------------------- atomic writes
def _atomic(path, write) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a file.
    The folder is created when missing."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, then a rename)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic(path, write)


def atomic_write_json(path, obj, indent: int = 2) -> None:
    """``json.dump`` of ``obj`` to ``path``, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str))



# ---------------------------------------------------------------------------------------------- tracing
def is_tracing() -> bool:
    """True under any tracer or exporter (``torch.compile``, ``torch.export``, ``torch.jit.trace``/``script``,
    ``torch.onnx.export``): code that would time, cache by identity or leave the autograd key must not."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    exporting = getattr(torch.compiler, "is_exporting", None)
    if exporting is not None and exporting():
        return True
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and onnx.is_in_onnx_export())
