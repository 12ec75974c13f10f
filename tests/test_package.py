import subprocess
import sys

import torch

import tdconv


def test_import_and_version():
    assert isinstance(tdconv.__version__, str)
    assert callable(tdconv.cp_als)


def test_extension_loaded(require_ext):
    assert tdconv.has_ext()
    assert hasattr(torch.ops.tdconv, "cp_als")
    assert tdconv.unavailable_reasons("cpu") == []


def test_cuda_reasons_are_explained():
    reasons = tdconv.unavailable_reasons("cuda")
    if not torch.cuda.is_available() or not tdconv.has_cuda_ext():
        assert reasons and all(isinstance(r, str) and r for r in reasons)


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "tdconv.info"], capture_output=True, text=True, check=True).stdout
    for key in ("torch", "python", "extension_loaded", "cuda_kernels_built", "cuda_available", "reasons_cuda_unavailable"):
        assert key in out


def test_docstring_examples_run(require_ext):
    import doctest

    import tdconv.decompose
    result = doctest.testmod(tdconv.decompose, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0
