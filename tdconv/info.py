"""``python -m tdconv.info``: what was built, what is available here, and why not."""
from __future__ import annotations

import sys

import torch

from . import _ext
from .utils import describe_environment
from .version import __version__


def collect() -> dict:
    """Build and runtime facts as a dict (what ``python -m tdconv.info`` prints): the environment of
    :func:`tdconv.utils.describe_environment`, then what was built and what can run here."""
    env = describe_environment()
    info = {
        "tdconv": __version__,
        "python": env["python"],
        "platform": env["platform"],
        "torch": env["torch"],
        "torch_cuda": env["torch_cuda"],
        "cpu": env["cpu"],
        "cpu_threads": env["threads"],
        "extension_loaded": _ext.has_ext(),
        "extension_built_against_torch": getattr(_ext._C, "torch_version", None),
        "cpu_kernels": _ext.can_run("cpu"),
        "cpu_kernels_isa": torch.ops.tdconv.cpu_isa() if _ext.has_ext() else None,
        "cuda_kernels_built": _ext.has_cuda_ext(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cuda_kernels_usable": _ext.can_run("cuda"),
        "reasons_cpu_unavailable": _ext.unavailable_reasons("cpu"),
        "reasons_cuda_unavailable": _ext.unavailable_reasons("cuda"),
    }
    return info


def main() -> int:
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = "; ".join(value) if value else "-"
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
