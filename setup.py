"""Build script for tdconv and its extension ``tdconv._C``.

The CUDA sources are compiled when a CUDA toolkit is found *and* the torch used for the build is a
CUDA build; a visible GPU is never required. Environment variables:

- ``TDCONV_CUDA=1`` / ``TDCONV_CUDA=0``: force the CUDA part on / off (on fails loudly when impossible).
- ``CUDA_HOME`` / ``CUDA_PATH``: the CUDA toolkit to use (otherwise it is located, see below).
- ``TORCH_CUDA_ARCH_LIST``: architectures to build for (default ``8.0;9.0+PTX``).
- ``TDCONV_DEBUG=1``: build without optimisation, with debug symbols.
- ``TDCONV_LIMITED_API=0``: build against the full Python C API instead of the stable ABI (abi3).
- ``MAX_JOBS``: parallel compile jobs (ninja).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(msg):
    print(f"[tdconv setup] {msg}", flush=True)


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_toolkit():
    """Return the root of a CUDA toolkit, or None.

    ``nvcc`` on PATH may be a wrapper script or a symlink, so its parent folder is not trusted:
    symlinks are resolved, wrapper scripts are read for the real nvcc, and the usual install
    locations are tried last.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            path = os.environ[var]
            if _is_toolkit(path):
                return path
            log(f"{var}={path} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(root):
            return root
        try:
            with open(real, "rb") as f:
                head = f.read(65536)
            if head.startswith(b"#!"):
                for cand in re.findall(rb"(/[\w./+-]+)/bin/nvcc\b", head):
                    cand = os.path.realpath(cand.decode())
                    if _is_toolkit(cand):
                        return cand
        except OSError:
            pass
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    for cand in candidates:
        if _is_toolkit(cand):
            return os.path.realpath(cand)
    return None


def toolkit_version(root):
    try:
        with open(os.path.join(root, "include", "cuda.h")) as f:
            m = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", f.read())
        if m:
            v = int(m.group(1))
            return f"{v // 1000}.{(v % 1000) // 10}"
    except OSError:
        pass
    return None


def decide_cuda():
    """Return (build_cuda, toolkit_root, reason)."""
    force = os.environ.get("TDCONV_CUDA", "").strip().lower()
    if force in ("0", "off", "false", "no"):
        return False, None, "TDCONV_CUDA=0"
    root = find_cuda_toolkit()
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif root is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        tk = toolkit_version(root)
        if tk is not None and tk.split(".")[0] != torch.version.cuda.split(".")[0]:
            reason = f"CUDA toolkit {tk} at {root} does not match torch's CUDA {torch.version.cuda}"
    if reason is not None:
        if force in ("1", "on", "true", "yes"):
            sys.exit(f"[tdconv setup] TDCONV_CUDA=1 but the CUDA part cannot be built: {reason}")
        return False, root, reason
    return True, root, f"toolkit {toolkit_version(root)} at {root}, torch CUDA {torch.version.cuda}"


def torch_base_version():
    return torch.__version__.split("+")[0]


def limited_api_version():
    """``(major, minor)`` of the stable ABI the extension is compiled for, or None for the full C API.

    torch's BuildExtension compiles every ``py_limited_api`` extension with
    ``-DPy_LIMITED_API=cpp_extension.min_supported_cpython`` (the oldest Python that torch supports),
    so the wheel's ``cpXY-abi3`` tag and ``python_requires`` are taken from that same value. A torch
    whose cpp_extension does not define it gets a full-API build: nothing then says which limited
    API the headers would be compiled for.
    """
    if os.environ.get("TDCONV_LIMITED_API", "1") == "0":
        return None
    hexcode = getattr(cpp_extension, "min_supported_cpython", None)
    if hexcode is None:
        log("torch's cpp_extension sets no Py_LIMITED_API: building against the full Python C API")
        return None
    v = int(hexcode, 16)
    return (v >> 24) & 0xFF, (v >> 16) & 0xFF


LIMITED_API = limited_api_version()


def make_extension():
    build_cuda, root, reason = decide_cuda()
    debug = os.environ.get("TDCONV_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/decomp/*.cpp")
                     + glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("TDCONV_TORCH_VERSION", f'"{torch_base_version()}"')]
    limited = LIMITED_API is not None
    cxx_flags = opt + ["-fdiagnostics-color=always", "-Wno-unused-parameter"]
    link_flags = []
    # at::parallel_for is an inline OpenMP loop in the headers of an OpenMP build of torch: without
    # -fopenmp it silently runs on one thread. The libgomp.so.1 it links is the one torch has
    # already loaded (same soname), so there is one thread pool.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
        log("OpenMP: on (at::parallel_for runs multi-threaded)")
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}")
    if build_cuda:
        cpp_extension.CUDA_HOME = root
        os.environ["CUDA_HOME"] = root
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("TDCONV_WITH_CUDA", "1"))
        log(f"building CPU + CUDA: {reason}; TORCH_CUDA_ARCH_LIST={arch}")
        return cpp_extension.CUDAExtension(
            "tdconv._C", sources, define_macros=define_macros, py_limited_api=limited,
            extra_compile_args={"cxx": cxx_flags, "nvcc": opt + ["-lineinfo", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    log(f"building CPU only: {reason}")
    return cpp_extension.CppExtension(
        "tdconv._C", sources, define_macros=define_macros, py_limited_api=limited,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
    )


def read_version():
    with open(os.path.join(HERE, "tdconv", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


setup(
    name="tdconv",
    version=read_version(),
    description="Tensor-decomposed convolutions that are actually faster: CP/Tucker engine and fused kernels",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tdconv", "tdconv.*"]),
    # An abi3 wheel runs on every CPython from the limited API it was compiled for on.
    python_requires=">=%d.%d" % (LIMITED_API or (3, 9)),
    # The extension is compiled against exactly this torch; pinning it at install time makes a
    # mismatched build/runtime pair impossible (pip upgrades or downgrades torch to match).
    install_requires=[f"torch=={torch_base_version()}", "numpy", "ptflops"],
    extras_require={"test": ["pytest", "tensorly==0.10.*", "scipy", "torchvision", "ptflops", "matplotlib", "onnx",
                             "onnxscript", "onnxruntime", "timm"],
                    "bench": ["tensorly==0.10.*", "torchvision", "ptflops", "onnx", "onnxscript", "onnxruntime", "timm"],
                    "timm": ["timm"],
                    "deploy": ["onnx", "onnxscript", "onnxruntime"],
                    "experiment": ["torchvision", "matplotlib"]},
    entry_points={"console_scripts": ["tdconv=tdconv.cli:main"]},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp%d%d" % LIMITED_API}} if LIMITED_API else {},
    zip_safe=False,
)
