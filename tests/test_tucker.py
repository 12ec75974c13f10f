import pytest
import torch

import tdconv
from tdconv import reference as ref

from conftest import planted_tucker


@pytest.mark.parametrize("shape,ranks,modes", [
    ((12, 10, 8), (4, 3, 5), (0, 1, 2)), ((16, 12, 3, 3), (6, 5), (0, 1)), ((10, 9, 8), (4,), (2,)),
    ((14, 11), (5, 4), None)])
@pytest.mark.parametrize("algo", ["hosvd", "hooi"])
def test_planted_recovery(require_ext, device, shape, ranks, modes, algo):
    for dtype, bound in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        x = planted_tucker(shape, ranks, modes if modes is not None else tuple(range(len(shape))), dtype, device)
        fn = tdconv.tucker_hosvd if algo == "hosvd" else tdconv.tucker_hooi
        t = fn(x, ranks, modes=modes)
        assert t.rel_error < bound
        assert t.core.dtype == dtype and t.core.device.type == device.type
        for f in t.factors:  # orthonormal columns
            torch.testing.assert_close(f.T @ f, torch.eye(f.shape[1], dtype=dtype, device=device),
                                       atol=50 * torch.finfo(dtype).eps ** 0.5 if dtype == torch.float32 else 1e-10,
                                       rtol=0)


def test_hosvd_full_rank_is_exact(require_ext, device):
    x = torch.randn(7, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    t = tdconv.tucker_hosvd(x, (7, 6, 5))
    assert t.rel_error < 1e-12
    t2 = tdconv.tucker_hosvd(x, (7, 6), modes=(0, 1))
    assert t2.rel_error < 1e-12 and t2.core.shape == (7, 6, 5)


def test_hooi_improves_on_hosvd(require_ext, device):
    x = torch.randn(20, 16, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    hosvd = tdconv.tucker_hosvd(x, (6, 5), modes=(0, 1))
    hooi = tdconv.tucker_hooi(x, (6, 5), modes=(0, 1), n_iter_max=50, tol=0)
    assert hooi.rel_error <= hosvd.rel_error + 1e-12
    errs = torch.tensor(hooi.errors, dtype=torch.float64)
    assert hooi.n_iter == 50 and (errs[1:] <= errs[:-1] + 1e-12).all()
    assert abs(errs[-1].item() - hooi.rel_error) < 1e-9


def test_matches_reference(require_ext, device):
    x = torch.randn(12, 10, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device)
    t = tdconv.tucker_hosvd(x, (5, 4), modes=(0, 1))
    core, factors = ref.tucker_hosvd(x, [5, 4], [0, 1])
    torch.testing.assert_close(t.core, core, atol=1e-9, rtol=0)
    for a, b in zip(t.factors, factors):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    h = tdconv.tucker_hooi(x, (5, 4), modes=(0, 1), n_iter_max=10, tol=0)
    core, factors, errs, n = ref.tucker_hooi(x, factors, [0, 1], n_iter_max=10, tol=0)
    assert n == h.n_iter
    torch.testing.assert_close(torch.tensor(h.errors, dtype=torch.float64), torch.tensor(errs, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(h.core, core, atol=1e-8, rtol=0)


def test_against_tensorly(require_ext):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker
    tl.set_backend("pytorch")
    try:
        x = torch.randn(32, 24, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        ours = tdconv.tucker_hooi(x, (12, 10), modes=(0, 1), n_iter_max=10, tol=0)
        (core, factors), _ = partial_tucker(x, rank=[12, 10], modes=[0, 1], n_iter_max=10, init="svd", tol=0)
        approx = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
        err_tl = float(torch.linalg.vector_norm(x - approx) / torch.linalg.vector_norm(x))
        assert abs(ours.rel_error - err_tl) < 1e-5, (ours.rel_error, err_tl)  # equal to 5 decimals
    finally:
        tl.set_backend("numpy")


def test_batched_equals_single(require_ext, device):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 12, 3, 3, generator=g, dtype=torch.float64).to(device) for _ in range(3)]
    for method, fn in (("hosvd", tdconv.tucker_hosvd), ("hooi", tdconv.tucker_hooi)):
        batch = tdconv.decompose_batch(xs, method, [(6, 5), (6, 5), (4, 4)], modes=(0, 1))
        for x, r, got in zip(xs, [(6, 5), (6, 5), (4, 4)], batch):
            single = fn(x, r, modes=(0, 1))
            assert got.ranks == r and got.n_iter == single.n_iter
            torch.testing.assert_close(got.core, single.core, atol=1e-9, rtol=0)


def test_negative_modes_and_int_rank(require_ext):
    x = torch.randn(8, 7, 6, dtype=torch.float64)
    t = tdconv.tucker_hosvd(x, 3, modes=(-1, 0))
    assert t.modes == (2, 0) and t.ranks == (3, 3) and t.core.shape == (3, 7, 3)
    torch.testing.assert_close(t.to_tensor(), ref.tucker_to_tensor(t.core, t.factors, [2, 0]))
    core, factors = t
    assert core is t.core and "TuckerTensor" in repr(t) and t.shape == (8, 7, 6)


@pytest.mark.parametrize("ranks,modes,exc,match", [
    ((9, 2), (0, 1), ValueError, "exceeds"),
    ((0, 2), (0, 1), ValueError, "ranks"),
    ((2, 2.5), (0, 1), TypeError, "ranks"),
    ((2, 2, 2), (0, 1), ValueError, "3 entries but 2 modes"),
    ((2, 2), (0, 3), ValueError, "out of range"),
    ((2, 2), (0, 0), ValueError, "repeated"),
    ((2, 2), (0, -4), ValueError, "out of range"),
    ((2,), (), ValueError, "at least one mode"),
    ((2, 2), ("a", 1), TypeError, "modes"),
])
def test_bad_arguments(ranks, modes, exc, match):
    x = torch.randn(8, 7, 6)
    for fn in (tdconv.tucker_hosvd, tdconv.tucker_hooi):
        with pytest.raises(exc, match=match):
            fn(x, ranks, modes=modes)


@pytest.mark.parametrize("tensor,exc,match", [
    (torch.ones(4, 4, dtype=torch.int32), TypeError, "real floating-point"),
    (torch.ones(4, 4, dtype=torch.complex128), TypeError, "real floating-point"),
    (torch.ones(5), ValueError, "at least 2 modes"), (torch.ones(3, 0), ValueError, "must not be empty"),
    (torch.full((3, 3), float("nan")), ValueError, "NaN or Inf"),
])
def test_bad_tensors(tensor, exc, match):
    with pytest.raises(exc, match=match):
        tdconv.tucker_hooi(tensor, 1)


def test_decompose_batch_arguments():
    xs = [torch.randn(6, 5, 4)]
    with pytest.raises(ValueError, match="method"):
        tdconv.decompose_batch(xs, "svd", 2)
    with pytest.raises(ValueError, match="list of 2 entries for 1 tensors"):
        tdconv.decompose_batch(xs, "cp", [2, 2])
    with pytest.raises(TypeError, match="unexpected options"):
        tdconv.decompose_batch(xs, "hosvd", 2, n_iter_max=3)
    with pytest.raises(TypeError, match="list or tuple"):
        tdconv.decompose_batch(torch.randn(3, 6, 5, 4), "cp", 2)


@pytest.mark.cuda
def test_cuda_matches_cpu(require_ext):
    x = torch.randn(24, 20, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = tdconv.tucker_hooi(x, (8, 6), modes=(0, 1), n_iter_max=20, tol=1e-10)
    b = tdconv.tucker_hooi(x.cuda(), (8, 6), modes=(0, 1), n_iter_max=20, tol=1e-10)
    assert a.n_iter == b.n_iter
    torch.testing.assert_close(b.core.cpu(), a.core, atol=1e-8, rtol=0)
    for u, v in zip(a.factors, b.factors):
        torch.testing.assert_close(v.cpu(), u, atol=1e-8, rtol=0)
