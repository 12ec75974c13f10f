import subprocess
import sys

import pytest
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
    import tdconv.nn
    for module in (tdconv.decompose, tdconv.nn):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 3 and result.failed == 0, module.__name__


def test_reference_fallback_when_extension_unavailable(monkeypatch):
    # Without the compiled ops the engine falls back to tdconv.reference, says so, and gives the
    # same answers.
    from tdconv import _ext
    x = torch.randn(10, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = [tdconv.cp_als(x, 4, n_iter_max=15, seed=0), tdconv.tucker_hooi(x, (4, 3), modes=(0, 1))]
    monkeypatch.setattr(_ext, "unavailable_reasons", lambda device=None: ["simulated: no extension"])
    with pytest.warns(RuntimeWarning, match="simulated: no extension"):
        cp = tdconv.cp_als(x, 4, n_iter_max=15, seed=0)
    with pytest.warns(RuntimeWarning):
        tk = tdconv.tucker_hooi(x, (4, 3), modes=(0, 1))
    if tdconv.has_ext():
        assert cp.n_iter == expected[0].n_iter
        torch.testing.assert_close(cp.weights, expected[0].weights, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(tk.core, expected[1].core, atol=1e-8, rtol=1e-8)
