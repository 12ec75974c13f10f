import pytest
import torch

import tdconv
from tdconv import reference as ref

from conftest import planted_cp


@pytest.mark.parametrize("shape,rank", [((12, 10, 8), 4), ((16, 12, 3), 6), ((9, 8, 7, 6), 3), ((20, 15), 5)])
def test_planted_recovery_float64(require_ext, device, shape, rank):
    x = planted_cp(shape, rank, torch.float64, device)
    cp = tdconv.cp_als(x, rank, n_iter_max=2000, tol=1e-14, init="random", seed=1)
    assert cp.rel_error < 1e-6
    assert cp.weights.device.type == device.type and cp.weights.dtype == torch.float64


@pytest.mark.parametrize("shape,rank", [((12, 10, 8), 4), ((16, 12, 3), 6), ((9, 8, 7, 6), 3)])
def test_planted_recovery_float32(require_ext, device, shape, rank):
    x = planted_cp(shape, rank, torch.float32, device)
    cp = tdconv.cp_als(x, rank, n_iter_max=2000, tol=1e-10, init="random", seed=1)
    assert cp.rel_error < 1e-4
    assert cp.weights.dtype == torch.float32


def test_rank_above_mode_size_svd_init(require_ext, device):
    # Rank 24 on a 3x3 spatial mode (9 entries): the normal case for conv kernels.
    x = torch.randn(32, 32, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    cp = tdconv.cp_als(x, 24, n_iter_max=30, init="svd", seed=0)
    assert [tuple(f.shape) for f in cp.factors] == [(32, 24), (32, 24), (9, 24)]
    assert torch.isfinite(cp.weights).all() and cp.rel_error < 1.0
    init = tdconv.initialize_cp(x, 24, init="svd", seed=0)
    # The first 9 columns of the spatial factor are its singular vectors: orthonormal.
    u = init.factors[2][:, :9]
    torch.testing.assert_close(u.T @ u, torch.eye(9, dtype=u.dtype, device=device), atol=1e-10, rtol=0)


def test_error_never_increases(require_ext, device):
    x = torch.randn(20, 18, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    cp = tdconv.cp_als(x, 10, n_iter_max=60, tol=0, init="random", seed=0)
    errs = torch.tensor(cp.errors, dtype=torch.float64)
    assert len(errs) == 60 and cp.n_iter == 60
    assert (errs[1:] <= errs[:-1] + 1e-12).all()
    # The norm-based error history agrees with the rebuilt tensor.
    assert abs(errs[-1].item() - cp.rel_error) < 1e-9


def test_same_seed_same_result(require_ext, device):
    x = torch.randn(16, 12, 9, generator=torch.Generator().manual_seed(0)).to(device)
    for init in ("random", "svd"):
        a = tdconv.cp_als(x, 12, n_iter_max=20, init=init, seed=7)
        b = tdconv.cp_als(x, 12, n_iter_max=20, init=init, seed=7)
        assert torch.equal(a.weights, b.weights)
        assert all(torch.equal(u, v) for u, v in zip(a.factors, b.factors))
    c = tdconv.cp_als(x, 12, n_iter_max=20, init="random", seed=8)
    assert not torch.equal(a.weights, c.weights)


@pytest.mark.parametrize("shape", [(14, 11, 9), (9, 14, 11), (11, 9, 14), (7, 6, 5, 4)])
def test_extension_matches_reference(require_ext, device, shape):
    # Same initial factors, same sweeps: the iterates agree (the root of the dimension tree moves with
    # the largest mode, the update order does not).
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    start = tdconv.initialize_cp(x, 5, init="random", seed=0)
    init = start.factors
    cp = tdconv.cp_als(x, 5, n_iter_max=25, tol=0, init=start)  # a CPTensor as the warm start
    w, fs, errs, n = ref.cp_als(x, init, n_iter_max=25, tol=0)
    assert n == cp.n_iter == 25
    torch.testing.assert_close(torch.tensor(cp.errors, dtype=torch.float64), torch.tensor(errs, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(cp.weights, w, atol=1e-8, rtol=1e-8)
    for a, b in zip(cp.factors, fs):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


def test_svd_init_matches_reference(require_ext, device):
    x = torch.randn(10, 12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device)
    init = tdconv.initialize_cp(x, 11, init="svd", seed=0).factors
    fill = [torch.zeros(s, max(11 - s, 0), dtype=torch.float64) for s in x.shape]
    expected = ref.cp_init_svd(x.cpu(), 11, fill)
    for got, exp, s in zip(init, expected, x.shape):
        k = min(11, s)
        torch.testing.assert_close(got[:, :k].cpu(), exp[:, :k], atol=1e-8, rtol=0)


def test_l2_reg_shrinks_weights(require_ext):
    x = torch.randn(12, 10, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = tdconv.cp_als(x, 8, n_iter_max=30, tol=0, seed=0)
    b = tdconv.cp_als(x, 8, n_iter_max=30, tol=0, seed=0, l2_reg=10.0)
    assert b.weights.norm() < a.weights.norm()
    w, _, _, _ = ref.cp_als(x, tdconv.initialize_cp(x, 8, seed=0).factors, 30, 0.0, 10.0)
    torch.testing.assert_close(b.weights, w, atol=1e-8, rtol=1e-8)


def test_tol_stops_early(require_ext):
    x = planted_cp((10, 9, 8), 3)
    cp = tdconv.cp_als(x, 3, n_iter_max=1000, tol=1e-4, init="random", seed=0)
    assert 1 < cp.n_iter < 1000 and len(cp.errors) == cp.n_iter
    assert abs(cp.errors[-2] - cp.errors[-1]) < 1e-4


def test_against_tensorly(require_ext):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac
    tl.set_backend("pytorch")
    try:
        for shape, rank in [((32, 32, 9), 16), ((24, 16, 3, 3), 8)]:
            x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            init = tdconv.initialize_cp(x, rank, init="svd", seed=0).factors
            ours = tdconv.cp_als(x, rank, n_iter_max=20, tol=0, init=(None, init))
            theirs = parafac(x, rank, n_iter_max=20, tol=0, init=tl.cp_tensor.CPTensor(
                (torch.ones(rank, dtype=x.dtype), [f.clone() for f in init])))
            err_tl = float(torch.linalg.vector_norm(x - tl.cp_to_tensor(theirs)) / torch.linalg.vector_norm(x))
            # The same iterates from the same start: the errors agree to 5 decimals (the README's claim).
            assert abs(ours.rel_error - err_tl) < 1e-5, (shape, ours.rel_error, err_tl)
    finally:
        tl.set_backend("numpy")


def test_batched_equals_single(require_ext, device):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 12, 9, generator=g, dtype=torch.float64).to(device) for _ in range(3)]
    xs.append(torch.randn(8, 12, 9, generator=g, dtype=torch.float64).to(device))
    ranks = [10, 10, 8, 4]  # above the spatial mode's size 9: random extra columns in the svd init
    batch = tdconv.decompose_batch(xs, "cp", ranks, n_iter_max=40, tol=1e-6, seed=0)
    for x, r, got in zip(xs, ranks, batch):
        single = tdconv.cp_als(x, r, n_iter_max=40, tol=1e-6, seed=0)
        assert got.n_iter == single.n_iter  # members converge independently
        torch.testing.assert_close(got.weights, single.weights, atol=1e-8, rtol=1e-8)
        assert abs(got.rel_error - single.rel_error) < 1e-9


def test_parallel_groups_equal_sequential(require_ext, device):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in [(16, 12, 9), (8, 12, 9), (16, 12, 9), (20, 6, 4)]]
    ranks = [10, 4, 10, 5]
    seq = tdconv.decompose_batch(xs, "cp", ranks, n_iter_max=30, seed=0, parallel=False)
    par = tdconv.decompose_batch(xs, "cp", ranks, n_iter_max=30, seed=0, parallel=True)
    for a, b in zip(seq, par):
        assert a.n_iter == b.n_iter
        torch.testing.assert_close(a.weights, b.weights, atol=1e-12, rtol=1e-12)
    for method in ("hosvd", "hooi"):
        seq = tdconv.decompose_batch(xs, method, [(4, 3)] * 4, modes=(0, 1), parallel=False)
        par = tdconv.decompose_batch(xs, method, [(4, 3)] * 4, modes=(0, 1), parallel=True)
        for a, b in zip(seq, par):
            torch.testing.assert_close(a.core, b.core, atol=1e-12, rtol=1e-12)


def test_layouts_and_half_precision(require_ext, device):
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    base = tdconv.cp_als(w, 6, n_iter_max=15, seed=0)
    cl = tdconv.cp_als(w.to(memory_format=torch.channels_last), 6, n_iter_max=15, seed=0)
    nc = tdconv.cp_als(w.transpose(0, 1).contiguous().transpose(0, 1), 6, n_iter_max=15, seed=0)
    for other in (cl, nc):
        torch.testing.assert_close(other.weights, base.weights, atol=1e-9, rtol=1e-9)
    # Half-precision kernels are decomposed in float32: the fit differs from the float64 one only by the
    # rounding of the input (float16: ~5e-4 relative, bfloat16: ~4e-3).
    half = tdconv.cp_als(w.half(), 6, n_iter_max=15, seed=0)
    assert half.weights.dtype == torch.float32 and abs(half.rel_error - base.rel_error) < 2e-3
    bf = tdconv.cp_als(w.bfloat16(), 6, n_iter_max=15, seed=0)
    assert bf.weights.dtype == torch.float32 and abs(bf.rel_error - base.rel_error) < 1e-2


def test_cptensor_container():
    x = planted_cp((6, 5, 4), 2)
    cp = tdconv.cp_als(x, 2, n_iter_max=300, init="random", seed=0)
    weights, factors = cp
    assert weights is cp.weights and factors is cp.factors
    assert cp.rank == 2 and cp.shape == (6, 5, 4) and "CPTensor" in repr(cp)
    torch.testing.assert_close(cp.to_tensor(), x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=2.5), TypeError, "rank"),
    (dict(rank=True), TypeError, "rank"),
    (dict(rank=3, n_iter_max=0), ValueError, "n_iter_max"),
    (dict(rank=3, tol=-1.0), ValueError, "tol"),
    (dict(rank=3, l2_reg=-1.0), ValueError, "l2_reg"),
    (dict(rank=3, init="magic"), ValueError, "init"),
    (dict(rank=3, init=(None, [torch.zeros(2, 2)])), ValueError, "init"),
])
def test_bad_arguments(kwargs, exc, match):
    x = torch.randn(6, 5, 4)
    rank = kwargs.pop("rank")
    with pytest.raises(exc, match=match):
        tdconv.cp_als(x, rank, **kwargs)


@pytest.mark.parametrize("tensor,exc,match", [
    (torch.ones(4, 4, dtype=torch.int64), TypeError, "floating"),
    (torch.ones(4, 4, dtype=torch.bool), TypeError, "floating"),
    (torch.ones(4, 4, dtype=torch.complex64), TypeError, "floating"),
    (torch.ones(4), ValueError, "order >= 2"),
    (torch.ones(0, 4, 3), ValueError, "empty"),
    (torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), ValueError, "NaN"),
    (torch.tensor([[1.0, float("inf")], [1.0, 2.0]]), ValueError, "Inf"),
    (torch.zeros(3, 3), ValueError, "zeros"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
])
def test_bad_tensors(tensor, exc, match):
    with pytest.raises(exc, match=match):
        tdconv.cp_als(tensor, 2)


def test_singular_problem_never_returns_nan(require_ext):
    # Rank far above what the tensor supports: the normal equations become singular.
    x = torch.zeros(4, 3, 2, dtype=torch.float64)
    x[0, 0, 0] = 1.0
    # The engine solves it (the fit is exact), without NaN and without the warning of a failed sweep.
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cp = tdconv.cp_als(x, 12, n_iter_max=20, init="random", seed=0)
    assert not [w for w in caught if "singular" in str(w.message)]
    assert torch.isfinite(cp.weights).all() and all(torch.isfinite(f).all() for f in cp.factors)
    assert cp.rel_error < 1e-10 and cp.n_iter < 20


@pytest.mark.parametrize("shape,dim", [((2, 5, 3), 1), ((2, 4, 5, 3), 1), ((2, 4, 5, 3), 2), ((3, 2, 3, 4, 7), 2)])
def test_mode_contract_matches_reference(require_ext, device, shape, dim):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        y = torch.randn(shape, generator=g, dtype=dtype).to(device)
        u = torch.randn(shape[0], shape[dim], shape[-1], generator=g, dtype=dtype).to(device)
        got = torch.ops.tdconv.mode_contract(y, u, dim)
        torch.testing.assert_close(got, ref.mode_contract(y, u, dim))


def test_mode_contract_bad_input(require_ext):
    y = torch.randn(2, 4, 5, 3)
    # Messages are assembled without std::ostream (see csrc/common/checks.h): check the formatting too.
    with pytest.raises(RuntimeError, match=r"u must have shape \[2, 4, 3\], got \[2, 3, 3\]"):
        torch.ops.tdconv.mode_contract(y, torch.randn(2, 3, 3), 1)
    with pytest.raises(RuntimeError, match=r"tol must be >= 0, got -1\.0"):
        torch.ops.tdconv.cp_als(y, [torch.randn(2, s, 2) for s in y.shape[1:]], 5, -1.0, 0.0, 1)
    with pytest.raises(TypeError, match="init\\[0\\] has dtype Double but x has Float"):
        torch.ops.tdconv.cp_als(y, [torch.randn(2, s, 2, dtype=torch.float64) for s in y.shape[1:]], 5, 0.0, 0.0, 1)
    with pytest.raises(RuntimeError, match="dim must be in"):
        torch.ops.tdconv.mode_contract(y, torch.randn(2, 4, 3), 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.tdconv.mode_contract(y.int(), torch.randn(2, 4, 3).int(), 1)


@pytest.mark.cuda
def test_cuda_matches_cpu(require_ext):
    x = torch.randn(32, 24, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for init in ("svd", "random"):
        a = tdconv.cp_als(x, 12, n_iter_max=30, tol=1e-9, init=init, seed=0)
        b = tdconv.cp_als(x.cuda(), 12, n_iter_max=30, tol=1e-9, init=init, seed=0)
        assert a.n_iter == b.n_iter
        torch.testing.assert_close(b.weights.cpu(), a.weights, atol=1e-7, rtol=1e-7)
        for u, v in zip(a.factors, b.factors):
            torch.testing.assert_close(v.cpu(), u, atol=1e-7, rtol=1e-7)


# ------------------------------------------------------------------------------------------------ EPC
def _degenerate(device="cpu"):
    """A random 24x24x9 tensor fitted at rank 16 by 400 ALS sweeps: ALS drifts into components that
    cancel each other (sum of squared component norms ~11x the tensor's squared norm)."""
    torch.manual_seed(0)
    x = torch.randn(24, 24, 9, dtype=torch.float64).to(device)
    return x, tdconv.cp_als(x, 16, n_iter_max=400, tol=0, seed=0)


def test_epc_keeps_the_error_and_shrinks_degenerate_components(require_ext, device):
    x, cp = _degenerate(device)
    assert cp.norm_ratio > 5  # degenerate
    delta = cp.rel_error * cp.tensor_norm
    epc = tdconv.cp_epc(cp, x, n_iter_max=30)
    assert epc.rel_error * epc.tensor_norm <= delta * (1 + 1e-6)
    assert max(epc.errors) * epc.tensor_norm <= delta * (1 + 1e-6)  # never above delta along the way
    assert epc.norm_ratio < 0.7 * cp.norm_ratio
    assert epc.sensitivity < cp.sensitivity
    assert epc.diagnostics()["max_component_norm"] < cp.diagnostics()["max_component_norm"]
    assert all(b <= a + 1e-9 for a, b in zip(epc.norm_history, epc.norm_history[1:]))  # monotone
    assert all(torch.allclose(f.norm(dim=0), torch.ones(16, dtype=f.dtype, device=device)) for f in epc.factors)
    looser = tdconv.cp_epc(cp, x, delta=1.05 * delta, n_iter_max=30)  # a looser bound buys smaller norms
    assert looser.norm_ratio < epc.norm_ratio and looser.rel_error * looser.tensor_norm <= 1.05 * delta * (1 + 1e-6)


def test_epc_leaves_a_well_conditioned_fit_unchanged(require_ext, device):
    x = planted_cp((12, 10, 8), 4, device=device)
    cp = tdconv.cp_als(x, 4, n_iter_max=200, seed=0)
    epc = tdconv.cp_epc(cp, x, n_iter_max=30)
    assert cp.rel_error < 1e-6 and epc.rel_error < 1e-6
    torch.testing.assert_close(epc.to_tensor(), x, atol=1e-5 * cp.tensor_norm, rtol=0)
    assert abs(epc.norm_ratio - cp.norm_ratio) < 1e-3 * cp.norm_ratio


def test_epc_matches_reference(require_ext, device):
    from tdconv import reference as ref
    x, cp = _degenerate(device)
    delta = cp.rel_error * cp.tensor_norm
    epc = tdconv.cp_epc(cp, x, n_iter_max=10, tol=0)
    w, fs, norms, n, errs = ref.cp_epc(x, cp.weights, cp.factors, delta, 10, 0)
    assert n == epc.n_iter == 10
    assert norms == pytest.approx(epc.norm_history, rel=1e-6) and errs == pytest.approx(epc.errors, rel=1e-6)
    torch.testing.assert_close(epc.to_tensor(), ref.cp_to_tensor(w, fs), atol=1e-6 * cp.tensor_norm, rtol=0)


def test_epc_from_cp_als_flag_and_batches(require_ext):
    torch.manual_seed(1)
    x = torch.randn(16, 12, 9)
    plain = tdconv.cp_als(x, 8, n_iter_max=100, seed=0)
    with_epc = tdconv.cp_als(x, 8, n_iter_max=100, seed=0, epc=True)
    assert with_epc.rel_error <= plain.rel_error * (1 + 1e-4) and with_epc.norm_ratio < plain.norm_ratio
    assert len(with_epc.norm_history) == with_epc.n_iter > 0
    batch = tdconv.decompose_batch([x, 3 * x], "cp", 8, n_iter_max=100, seed=0, epc=True)
    assert batch[0].norm_ratio == pytest.approx(with_epc.norm_ratio, rel=1e-4)
    assert batch[1].norm_ratio == pytest.approx(with_epc.norm_ratio, rel=1e-3)  # scale-free
    conv = torch.nn.Conv2d(12, 16, 3)
    layer = tdconv.FactorizedConv2d.from_conv(conv, "cp", 8, seed=0, epc=True)
    plain_layer = tdconv.FactorizedConv2d.from_conv(conv, "cp", 8, seed=0)
    assert layer.component_norms().square().sum() <= plain_layer.component_norms().square().sum()


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, cp: tdconv.cp_epc(cp, x[:, :4]), ValueError, "cp must be a CPTensor"),
    (lambda x, cp: tdconv.cp_epc((cp.weights, cp.factors[:2]), x), ValueError, "cp must be a CPTensor"),
    (lambda x, cp: tdconv.cp_epc(cp, x, delta=-1.0), ValueError, "delta must be >= 0"),
    (lambda x, cp: tdconv.cp_epc(cp, x, n_iter_max=0), ValueError, "n_iter_max must be >= 1"),
    (lambda x, cp: tdconv.cp_epc(cp, x * float("nan")), ValueError, "NaN or Inf"),
    (lambda x, cp: tdconv.cp_als(x, 3, epc=1), TypeError, "epc must be True or False"),
])
def test_epc_bad_input(require_ext, call, exc, match):
    x = torch.randn(6, 5, 4)
    cp = tdconv.cp_als(x, 3, n_iter_max=5, seed=0)
    with pytest.raises(exc, match=match):
        call(x, cp)


def test_warm_start_from_a_cptensor(require_ext):
    # A CPTensor (what cp_als returns, the documented warm start) continues where it stopped.
    x = torch.randn(12, 10, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    first = tdconv.cp_als(x, 6, n_iter_max=10, tol=0, seed=0)
    more = tdconv.cp_als(x, 6, n_iter_max=10, tol=0, init=first)
    straight = tdconv.cp_als(x, 6, n_iter_max=20, tol=0, seed=0)
    assert more.rel_error <= first.rel_error + 1e-12
    assert abs(more.rel_error - straight.rel_error) < 1e-8
    assert first[0] is first.weights and first[1] is first.factors and len(first) == 2
    batch = tdconv.decompose_batch([x, x], "cp", 6, n_iter_max=10, tol=0, init=first)
    assert all(abs(b.rel_error - more.rel_error) < 1e-10 for b in batch)
    with pytest.raises(ValueError, match=r"weights \[5\]"):
        tdconv.cp_als(x, 5, init=first)


def test_seed_and_rank_lists_are_checked():
    x = torch.randn(6, 5, 4)
    with pytest.raises(TypeError, match="seed must be an integer or None, got float 1.7"):
        tdconv.cp_als(x, 2, seed=1.7)
    with pytest.raises(TypeError, match="seed must be an integer"):
        tdconv.decompose_batch([x], "cp", 2, seed=1.7)
    with pytest.raises(TypeError, match="seed must be an integer"):
        tdconv.initialize_cp(x, 2, seed="0")
    with pytest.raises(ValueError, match=r"ambiguous.*pass a tuple \(3, 2\)"):
        tdconv.decompose_batch([x, x], "hooi", [3, 2], modes=(0, 1))
    shared = tdconv.decompose_batch([x, x], "hooi", (3, 2), modes=(0, 1))
    assert [t.ranks for t in shared] == [(3, 2), (3, 2)]
    per = tdconv.decompose_batch([x, x], "hooi", [(3, 2), (2, 2)], modes=(0, 1))
    assert [t.ranks for t in per] == [(3, 2), (2, 2)]
    with pytest.raises(ValueError, match="meta device"):
        tdconv.cp_als(torch.empty(6, 5, 4, device="meta"), 2)
