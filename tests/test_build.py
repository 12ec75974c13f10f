"""What setup.py declares about the wheel agrees with what torch's cpp_extension compiles (no build)."""
import inspect
import os
import runpy

import pytest
import setuptools
from packaging.specifiers import SpecifierSet
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_kwargs(monkeypatch, limited="1"):
    """The keyword arguments setup.py passes to setuptools.setup (setup() itself is not run)."""
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setenv("TDCONV_CUDA", "0")  # the CUDA branch would set CUDA_HOME in this process
    monkeypatch.setenv("TDCONV_LIMITED_API", limited)
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return captured


def _compiled_limited_api():
    """(major, minor) of the -DPy_LIMITED_API that cpp_extension's BuildExtension adds to every
    py_limited_api extension (its module constant min_supported_cpython, a 0xMMmm0000 hexcode)."""
    hexcode = getattr(cpp_extension, "min_supported_cpython", None)
    if hexcode is None:
        pytest.skip("this torch's cpp_extension does not define Py_LIMITED_API itself")
    # The constant is what BuildExtension passes to the compiler: if that ever changes, so must setup.py.
    assert "-DPy_LIMITED_API={min_supported_cpython}" in inspect.getsource(cpp_extension.BuildExtension)
    v = int(hexcode, 16)
    return (v >> 24) & 0xFF, (v >> 16) & 0xFF


def test_abi3_tag_and_python_requires_match_the_compiled_limited_api(monkeypatch):
    major, minor = _compiled_limited_api()
    kw = _setup_kwargs(monkeypatch)
    (ext,) = kw["ext_modules"]
    assert ext.py_limited_api is True
    # The wheel's tag cpXY-abi3 promises every CPython >= X.Y: it must be the version compiled for.
    assert kw["options"]["bdist_wheel"]["py_limited_api"] == f"cp{major}{minor}"
    spec = SpecifierSet(kw["python_requires"])
    assert f"{major}.{minor}" in spec
    assert f"{major}.{minor - 1}" not in spec, (kw["python_requires"], "admits a Python below the limited API")


def test_full_api_build_has_no_abi3_tag(monkeypatch):
    kw = _setup_kwargs(monkeypatch, limited="0")
    (ext,) = kw["ext_modules"]
    assert ext.py_limited_api is False
    assert "bdist_wheel" not in kw.get("options", {})
