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
    if torch.cuda.is_available() and tdconv.has_cuda_ext():
        assert reasons == []
    else:
        assert reasons and all(isinstance(r, str) and r for r in reasons)
        if not tdconv.has_cuda_ext():
            assert any("built without CUDA" in r for r in reasons)
        if not torch.cuda.is_available():
            assert any("no CUDA device" in r for r in reasons)


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "tdconv.info"], capture_output=True, text=True, check=True).stdout
    for key in ("torch", "python", "extension_loaded", "cuda_kernels_built", "cuda_available", "reasons_cuda_unavailable"):
        assert key in out


def test_docstring_examples_run(require_ext):
    import doctest

    import importlib
    # Every public function with an example; the count guards against examples silently not running.
    names = {"tdconv.decomposition.cp": 3, "tdconv.decomposition.tucker": 2, "tdconv.decomposition.batch": 1,
             "tdconv.nn.conv": 1, "tdconv.nn.live_taps": 1}
    for name, count in names.items():
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, name
        assert result.attempted >= count, (name, result.attempted)


def test_reference_fallback_when_extension_unavailable(monkeypatch):
    # Without the compiled ops the engine falls back to tdconv.reference, says so, and gives the
    # same answers.
    from tdconv import _ext
    x = torch.randn(10, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = [tdconv.cp_als(x, 4, n_iter_max=15, seed=0), tdconv.tucker_hooi(x, (4, 3), modes=(0, 1))]
    monkeypatch.setattr(_ext, "unavailable_reasons", lambda device=None: ["simulated: no extension"])
    with pytest.warns(tdconv.FallbackWarning, match="cp_als.*simulated: no extension"):
        cp = tdconv.cp_als(x, 4, n_iter_max=15, seed=0)
    with pytest.warns(tdconv.FallbackWarning, match="tucker_hooi.*simulated: no extension"):
        tk = tdconv.tucker_hooi(x, (4, 3), modes=(0, 1))
    if tdconv.has_ext():
        assert cp.n_iter == expected[0].n_iter
        torch.testing.assert_close(cp.weights, expected[0].weights, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(tk.core, expected[1].core, atol=1e-8, rtol=1e-8)


def test_fallback_warning_is_an_error_under_pytest(monkeypatch):
    # A broken build must not pass the suite on the reference: the configuration turns the warning into an
    # error (pyproject.toml, filterwarnings).
    from tdconv import _ext
    monkeypatch.setattr(_ext, "unavailable_reasons", lambda device=None: ["simulated: no extension"])
    with pytest.raises(tdconv.FallbackWarning, match="simulated: no extension"):
        tdconv.tucker_hosvd(torch.randn(6, 5, 4), (3, 2), modes=(0, 1))


def test_conv_ops_use_the_same_fallback(monkeypatch):
    from tdconv import _ext, ops, reference
    g = torch.Generator().manual_seed(0)
    x, first, spatial, last = (torch.randn(2, 6, 5, 5, generator=g), torch.randn(3, 6, generator=g),
                               torch.randn(3, 3, 3, generator=g), torch.randn(4, 3, generator=g))
    expected = reference.cp_conv2d(x, first, spatial, last, None, (1, 1), (1, 1), (1, 1))
    monkeypatch.setattr(_ext, "unavailable_reasons", lambda device=None: ["simulated: no extension"])
    with pytest.warns(tdconv.FallbackWarning, match="cp_conv2d.*simulated: no extension"):
        y = ops.cp_conv2d(x, first, spatial, last, None, (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(y, expected)
