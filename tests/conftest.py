import os

import pytest
import torch

import tdconv

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device test runs on the CPU and, where a GPU is present, on CUDA. On CUDA the extension's
    CUDA part must be there: a test must not pass on the pure-PyTorch fallback of a CPU-only build."""
    if request.param == "cuda" and not tdconv.has_cuda_ext() and os.environ.get("TDCONV_ALLOW_NO_EXT") != "1":
        pytest.fail("a GPU is present but tdconv._C was built without its CUDA part: "
                    + "; ".join(tdconv.unavailable_reasons("cuda")))
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _restore_rng():
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


@pytest.fixture(scope="session")
def require_ext():
    """The compiled extension must be loaded unless TDCONV_ALLOW_NO_EXT=1 (a broken build must not pass
    silently on the reference fallback)."""
    if not tdconv.has_ext() and os.environ.get("TDCONV_ALLOW_NO_EXT") != "1":
        pytest.fail("tdconv._C is not loaded: " + "; ".join(tdconv.unavailable_reasons("cpu")))
    if not tdconv.has_ext():
        pytest.skip("tdconv._C not loaded")


def planted_cp(shape, rank, dtype=torch.float64, device="cpu", seed=0):
    """A tensor of exact CP rank `rank` with well-conditioned random factors."""
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(s, rank, generator=g, dtype=torch.float64) for s in shape]
    weights = torch.rand(rank, generator=g, dtype=torch.float64) + 0.5
    x = tdconv.reference.cp_to_tensor(weights, factors)
    return x.to(device=device, dtype=dtype)


def planted_tucker(shape, ranks, modes, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    core_shape = list(shape)
    for r, m in zip(ranks, modes):
        core_shape[m] = r
    core = torch.randn(core_shape, generator=g, dtype=torch.float64)
    factors = [torch.linalg.qr(torch.randn(shape[m], r, generator=g, dtype=torch.float64))[0]
               for r, m in zip(ranks, modes)]
    return tdconv.reference.tucker_to_tensor(core, factors, list(modes)).to(device=device, dtype=dtype)
