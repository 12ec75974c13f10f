"""The CUDA fused convolutions: their block program (csrc/common/fused_tiles.h) run on the CPU by its
host emulation, against the float64 reference, for every tiling edge (partial pixel blocks, output
channels and ranks that are not multiples of the tiles, several column chunks, taps in the padding);
their launch plan; and, on a GPU, the kernels themselves against the emulation and the reference.

The emulation runs each block with 256 host threads and a barrier for __syncthreads, fills shared
memory with NaN bytes before each block (a read of a value the program did not write shows up), and
counts WMMA loads / stores that break the alignment rules (the op raises then)."""

import pytest
import torch

import tdconv
from tdconv import reference as ref

BM = 64  # output pixels per block (fused_tiles.h)


def _operands(tucker, dtype, n=2, c_in=5, hw=(9, 7), ranks=(11, 6), c_out=70, k=(3, 3), bias=True, seed=0,
              device="cpu"):
    """x, first, spatial (CP [R, kh, kw] / Tucker core [R_out, R_in, kh, kw]), last, bias; ranks = (R_out, R_in)."""
    g = torch.Generator().manual_seed(seed)
    r_out, r_in = ranks if tucker else (ranks[0], ranks[0])

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    spatial = rnd(r_out, r_in, *k) if tucker else rnd(r_in, *k)
    return rnd(n, c_in, *hw), rnd(r_in, c_in), spatial, rnd(c_out, r_out), rnd(c_out) if bias else None


def _reference(tucker, args, conv, relu):
    f = ref.tucker_conv2d if tucker else ref.cp_conv2d
    return f(*[None if a is None else a.double().cpu() for a in args], *conv, relu)


def _emulated(tucker, args, conv, relu, smem_limit=1 << 30):
    return torch.ops.tdconv._fused_conv2d_emulated(*args, *[list(c) for c in conv], relu, tucker, smem_limit)


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


# (name, operands kwargs, (stride, padding, dilation), relu)
CASES = [
    ("3x3, two partial blocks", dict(), ((1, 1), (1, 1), (1, 1)), False),
    ("stride, asymmetric padding, dilation, relu, no bias", dict(bias=False, hw=(11, 10)),
     ((2, 1), (0, 2), (1, 2)), True),
    ("5x5 padding 4 dilation 2: taps in the padding", dict(k=(5, 5), hw=(6, 6)), ((1, 1), (4, 4), (2, 2)), False),
    ("1x3, one image, one block", dict(n=1, k=(1, 3), hw=(5, 6)), ((1, 1), (0, 1), (1, 1)), True),
    ("ranks over one column chunk, C_out a multiple of the tile", dict(ranks=(70, 19), c_out=128, hw=(5, 5)),
     ((1, 1), (1, 1), (1, 1)), False),
    ("1x1 kernel, stride 2", dict(k=(1, 1), ranks=(16, 16), c_out=3), ((2, 2), (0, 0), (1, 1)), False),
    ("one output channel, rank 1", dict(ranks=(1, 1), c_out=1), ((1, 1), (1, 1), (1, 1)), False),
]


@pytest.mark.parametrize("tucker", [False, True], ids=["cp", "tucker"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_emulated_kernel_matches_reference(require_ext, tucker, case):
    # Both layouts: an NCHW x gets its NCHW output written by the kernel (pixels fastest, through the
    # staging tile), a channels_last x a channels_last one (channels fastest, from the registers).
    _, kw, conv, relu = case
    for dtype, tol in [(torch.float64, 1e-13), (torch.float32, 1e-5)]:
        args = _operands(tucker, dtype, **kw)
        exact = _reference(tucker, args, conv, relu)
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = _emulated(tucker, (args[0].to(memory_format=fmt), *args[1:]), conv, relu)
            assert got.shape == exact.shape and got.dtype == dtype
            assert got.is_contiguous(memory_format=fmt)
            assert torch.isfinite(got).all()
            assert _rel(got, exact) < tol, (dtype, fmt, _rel(got, exact))


@pytest.mark.parametrize("tucker", [False, True], ids=["cp", "tucker"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_emulated_tensor_core_path(require_ext, tucker, dtype, case):
    # The WMMA form: half-precision tiles, float32 accumulation. Within a factor 2 of the error of the
    # chain computed in float32 from the same half-precision operands and rounded once, and every WMMA
    # call aligned (the op raises otherwise).
    _, kw, conv, relu = case
    args = _operands(tucker, dtype, **kw)
    exact = _reference(tucker, args, conv, relu)
    f = ref.tucker_conv2d if tucker else ref.cp_conv2d
    chain = f(*[None if a is None else a.float() for a in args], *conv, relu).to(dtype)
    chain_err = _rel(chain, exact)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = _emulated(tucker, (args[0].to(memory_format=fmt), *args[1:]), conv, relu)
        err = _rel(got, exact)
        assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
        assert err < (2e-3 if dtype == torch.float16 else 2e-2)
        assert err <= 2 * chain_err + 1e-4, (fmt, err, chain_err)


def test_emulated_kernel_layouts_and_empty_batch(require_ext):
    args = _operands(True, torch.float64)
    conv = ((1, 1), (1, 1), (1, 1))
    x_cl = args[0].to(memory_format=torch.channels_last)
    got = _emulated(True, (x_cl, *args[1:]), conv, False)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, _reference(True, args, conv, False))
    assert _emulated(True, args, conv, False).is_contiguous()
    empty = _emulated(True, (args[0][:0], *args[1:]), conv, False)
    assert empty.shape == (0, 70, 9, 7)
    # Neither layout (a strided view: copied once), and both (one channel: read as NCHW).
    wide = torch.randn(2, 5, 9, 14, dtype=torch.float64)
    x = wide[..., ::2]
    got = _emulated(True, (x, *args[1:]), conv, False)
    assert got.is_contiguous()
    torch.testing.assert_close(got, _reference(True, (x, *args[1:]), conv, False))
    one = _operands(True, torch.float64, c_in=1)
    x1 = one[0].to(memory_format=torch.channels_last)
    assert x1.is_contiguous() and x1.is_contiguous(memory_format=torch.channels_last)
    got = _emulated(True, (x1, *one[1:]), conv, False)
    assert got.is_contiguous()
    torch.testing.assert_close(got, _reference(True, one, conv, False))


def _plan(tucker, dtype, channels_last=True, **kw):
    args = list(_operands(tucker, dtype, bias=False, **kw)[:4])
    if channels_last:
        args[0] = args[0].to(memory_format=torch.channels_last)
    conv = ((1, 1), (1, 1), (1, 1))
    return torch.ops.tdconv._fused_conv2d_plan(*args, *[list(c) for c in conv], tucker)


ROWS = 64 * 8  # the output offset of each of a block's 64 pixels (int64)


def test_launch_plan(require_ext):
    # 2 images of 9 x 7 output pixels: 126 pixels in two blocks of 64.
    blocks, rp, smem, wmma = _plan(True, torch.float32, ranks=(70, 6))
    assert (blocks, rp, wmma) == (2, 80, 0)
    # y2 [64, 80 + 4] + A [64, 16 + 4] + B [16, 64 + 4], float32, each region rounded up to 128 bytes
    assert smem == (64 * 84 * 4) + (64 * 20 * 4) + (16 * 68 * 4) + ROWS
    # An NCHW x: the output is written pixels fastest, through a staging tile of the accumulators [64, 68]
    # (float32; float64 for float64).
    assert _plan(True, torch.float32, channels_last=False, ranks=(70, 6))[2] == smem + 64 * 68 * 4
    assert _plan(True, torch.float64, channels_last=False, ranks=(70, 6))[2] == (
        (64 * 82 * 8) + (64 * 18 * 8) + (16 * 66 * 8) + 64 * 68 * 8 + ROWS)  # float64 tiles: 2 elements of padding
    blocks, rp, smem16, wmma = _plan(True, torch.float16, ranks=(70, 6))
    # half tiles (8 elements of padding) and the float32 staging tile that WMMA always needs
    assert wmma == 1 and smem16 == (64 * 88 * 2) + (64 * 24 * 2) + (16 * 72 * 2) + 64 * 68 * 4 + ROWS
    assert _plan(True, torch.float16, channels_last=False, ranks=(70, 6))[2] == smem16
    # CP needs no im2col tile
    assert _plan(False, torch.float32, ranks=(70, 70))[2] == (64 * 84 * 4) + (16 * 68 * 4) + ROWS
    # a rank whose y2 tile exceeds what any GPU grants one block (227 KiB on sm_90): the CUDA op runs the chain
    assert _plan(False, torch.float32, ranks=(1024, 1024), hw=(3, 3), c_out=2)[2] > 227 * 1024


def test_emulation_refuses_a_plan_over_the_shared_memory_limit(require_ext):
    args = _operands(False, torch.float32)
    with pytest.raises(RuntimeError, match="smem_limit=1024"):
        _emulated(False, args, ((1, 1), (1, 1), (1, 1)), False, smem_limit=1024)


def test_emulation_checks_its_arguments(require_ext):
    args = _operands(True, torch.float32)
    with pytest.raises(RuntimeError, match="x has 5 channels but first expects 4"):
        _emulated(True, (args[0], args[1][:, :4], *args[2:]), ((1, 1), (1, 1), (1, 1)), False)
    with pytest.raises(RuntimeError, match=r"spatial must be \[R, kh, kw\]"):
        _emulated(False, args, ((1, 1), (1, 1), (1, 1)), False)


# ---- the fused small solve of a CP-ALS mode update (csrc/decomp/small_solve.h) ---------------------
def _solve_reference(grams, m, l2_reg):
    """solve_normalised(hadamard_grams(...)) of the ATen path, in float64."""
    v = grams[0].double()
    for g in grams[1:]:
        v = v * g.double()
    diag = v.diagonal(0, -2, -1)
    eps = torch.finfo(m.dtype).eps
    v = v + torch.diag_embed((diag.amax(-1, keepdim=True) * 10 * eps + l2_reg).expand_as(diag))
    u = torch.linalg.solve(v, m.double().transpose(1, 2)).transpose(1, 2)
    lam = u.norm(dim=1)
    return u / lam.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1), lam


def _solve_operands(b, i, r, n_grams, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grams = []
    for _ in range(n_grams):
        f = torch.randn(b, 3 * r + 2, r, generator=g, dtype=torch.float64)
        grams.append((f.transpose(1, 2) @ f).to(dtype))
    return grams, torch.randn(b, i, r, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("r,n_grams,i", [(1, 1, 5), (7, 2, 130), (16, 3, 9), (64, 2, 40)])
def test_emulated_small_solve_matches_reference(require_ext, r, n_grams, i):
    for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 2e-3)]:
        grams, m = _solve_operands(3, i, r, n_grams, dtype)
        for l2 in (0.0, 0.5):
            u, lam = torch.ops.tdconv._cp_solve_emulated(grams, m, l2)
            u_ref, lam_ref = _solve_reference(grams, m, l2)
            assert u.dtype == dtype and u.shape == m.shape and lam.shape == (3, r)
            assert _rel(u, u_ref) < tol and _rel(lam, lam_ref) < tol, (dtype, r, _rel(u, u_ref), _rel(lam, lam_ref))
            torch.testing.assert_close(u.double().norm(dim=1), torch.ones(3, r, dtype=torch.float64), rtol=1e-4, atol=0)


def test_emulated_small_solve_marks_a_singular_member(require_ext):
    grams, m = _solve_operands(2, 6, 4, 2, torch.float64)
    grams[0][1].zero_()  # member 1: V = 0, no ridge: the first pivot is 0
    u, lam = torch.ops.tdconv._cp_solve_emulated(grams, m, 0.0)
    assert torch.isnan(u[1]).all() and torch.isfinite(u[0]).all()
    torch.testing.assert_close(u[0], _solve_reference([g[:1] for g in grams], m[:1], 0.0)[0][0])
    _check_failed_member_is_nan(lambda g, m: torch.ops.tdconv._cp_solve_emulated(g, m, 0.0), "cpu")


def test_emulated_small_solve_checks_its_arguments(require_ext):
    grams, m = _solve_operands(2, 6, 65, 1, torch.float64)
    with pytest.raises(RuntimeError, match=r"the rank must be in \[1, 64\], got 65"):
        torch.ops.tdconv._cp_solve_emulated(grams, m, 0.0)
    grams, m = _solve_operands(2, 6, 4, 1, torch.float64)
    with pytest.raises(RuntimeError, match="every Gram matrix must be"):
        torch.ops.tdconv._cp_solve_emulated([grams[0][:, :3]], m, 0.0)


@pytest.mark.parametrize("triangular", [False, True])
def test_aten_solve_matches_reference(require_ext, triangular):
    # The ATen path of the same step: cholesky_solve (CPU) or two triangular solves (what CUDA runs, so
    # that a graph can capture it), for ranks beyond the fused solve's 64 too.
    for r, n_grams, i in [(1, 1, 5), (16, 3, 9), (96, 2, 40)]:
        for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 2e-3)]:
            grams, m = _solve_operands(3, i, r, n_grams, dtype)
            for l2 in (0.0, 0.5):
                u, lam = torch.ops.tdconv._cp_solve(grams, m, l2, triangular)
                u_ref, lam_ref = _solve_reference(grams, m, l2)
                assert u.dtype == dtype and u.shape == m.shape and lam.shape == (3, r)
                assert _rel(u, u_ref) < tol and _rel(lam, lam_ref) < tol, (dtype, r, _rel(u, u_ref))
    _check_failed_member_is_nan(lambda g, m: torch.ops.tdconv._cp_solve(g, m, 0.0, triangular), "cpu")
    grams, m = _solve_operands(2, 6, 4, 2, torch.float64)
    with pytest.raises(RuntimeError, match="the rank must be >= 1, got 0"):
        torch.ops.tdconv._cp_solve([g[:, :0, :0] for g in grams], m[:, :, :0], 0.0, triangular)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="l2_reg must be finite and >= 0"):
            torch.ops.tdconv._cp_solve(grams, m, bad, triangular)


def _check_failed_member_is_nan(solve, device):
    # Member 1's V = diag(1, 1, -1, 1) fails at the third pivot: Cholesky leaves a finite partial factor,
    # whose solve would be a finite wrong answer; the failure must make the whole member NaN.
    grams, m = _solve_operands(2, 6, 4, 1, torch.float64)
    grams[0][1] = torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    u, _ = solve([g.to(device) for g in grams], m.to(device))
    u = u.cpu()
    assert torch.isnan(u[1]).all() and torch.isfinite(u[0]).all()
    torch.testing.assert_close(u[0], _solve_reference([g[:1] for g in grams], m[:1], 0.0)[0][0])


# ---- on a GPU: the kernels themselves -----------------------------------------------------------
cuda = pytest.mark.cuda


def _cuda_ready():
    if not tdconv.has_cuda_ext():
        pytest.fail("a GPU is present but tdconv._C was built without its CUDA part")


STATS = ("graph_captures", "graph_capture_failures", "graph_replays", "small_solves", "fused_conv_launches",
         "fused_conv_fallbacks")


def _stats():
    """What the CUDA paths did since load: a path that silently fell back cannot pass for one that ran."""
    return dict(zip(STATS, torch.ops.tdconv._cuda_engine_stats()))


def test_engine_stats_are_counters(require_ext):
    stats = _stats()
    assert set(stats) == set(STATS) and all(isinstance(v, int) and v >= 0 for v in stats.values())


@cuda
@pytest.mark.parametrize("tucker", [False, True], ids=["cp", "tucker"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_fused_kernel_matches_emulation(require_ext, tucker, dtype, case):
    _cuda_ready()
    _, kw, conv, relu = case
    args = _operands(tucker, dtype, **kw)
    op = torch.ops.tdconv.tucker_conv2d if tucker else torch.ops.tdconv.cp_conv2d
    exact = _reference(tucker, args, conv, relu)
    tol = {torch.float64: 1e-13, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for fmt in (torch.contiguous_format, torch.channels_last):  # the NCHW and the NHWC epilogue
        x = args[0].to(memory_format=fmt)
        before = _stats()
        got = op(x.cuda(), *[None if a is None else a.cuda() for a in args[1:]], *[list(c) for c in conv], relu)
        torch.cuda.synchronize()
        after = _stats()
        assert after["fused_conv_launches"] == before["fused_conv_launches"] + 1, "the kernel did not run"
        assert got.dtype == dtype and got.shape == exact.shape and got.is_contiguous(memory_format=fmt)
        assert _rel(got, exact) < tol, fmt
        if fmt == torch.contiguous_format:  # (one emulation per case: they are slow, and tested in both layouts)
            # the same program on both sides: equal up to the order of float additions (and cuBLAS's y1)
            assert _rel(got, _emulated(tucker, args, conv, relu).double()) < tol


@cuda
def test_cuda_fused_kernel_large_and_fallback(require_ext):
    _cuda_ready()
    # many blocks over many images, in both layouts
    for tucker in (False, True):
        args = _operands(tucker, torch.float32, n=8, c_in=64, hw=(28, 28), ranks=(48, 32), c_out=96, device="cuda")
        op = torch.ops.tdconv.tucker_conv2d if tucker else torch.ops.tdconv.cp_conv2d
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = args[0].to(memory_format=fmt)
            launches = _stats()["fused_conv_launches"]
            got = op(x, *args[1:], [1, 1], [1, 1], [1, 1], True)
            assert _stats()["fused_conv_launches"] == launches + 1
            assert got.is_contiguous(memory_format=fmt)
            assert _rel(got, _reference(tucker, args, ((1, 1), (1, 1), (1, 1)), True)) < 1e-5, fmt
    # a y2 tile larger than one block's shared memory: the ATen chain, same result
    args = _operands(False, torch.float32, n=1, hw=(4, 4), ranks=(1100, 1100), c_out=8, device="cuda")
    fallbacks = _stats()["fused_conv_fallbacks"]
    got = torch.ops.tdconv.cp_conv2d(*args, [1, 1], [1, 1], [1, 1], False)
    assert _stats()["fused_conv_fallbacks"] == fallbacks + 1
    assert _rel(got, _reference(False, args, ((1, 1), (1, 1), (1, 1)), False)) < 1e-5


@cuda
def test_cuda_fused_layer_forward_and_backward(require_ext):
    _cuda_ready()
    for method, rank in [("cp", 12), ("tucker", (12, 8))]:
        layer = tdconv.FactorizedConv2d(16, 24, 3, padding=1, method=method, rank=rank, implementation="fused",
                                        device="cuda", dtype=torch.float64)
        chain = tdconv.FactorizedConv2d(16, 24, 3, padding=1, method=method, rank=rank, implementation="unfused",
                                        device="cuda", dtype=torch.float64)
        chain.load_state_dict(layer.state_dict())
        x = torch.randn(3, 16, 10, 10, device="cuda", dtype=torch.float64, requires_grad=True)
        y, y_ref = layer(x), chain(x)
        torch.testing.assert_close(y, y_ref)
        g, = torch.autograd.grad(y.square().sum(), x)
        g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
        torch.testing.assert_close(g, g_ref)


@cuda
def test_cuda_decompose_batch_on_a_side_stream(require_ext):
    # Groups run on their own streams, from worker threads: the results must be those of the sequential
    # run even when the caller works on a stream of its own, and usable on it without a synchronisation.
    _cuda_ready()
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g) for s in [(64, 64, 9)] * 3 + [(128, 64, 9)] * 2 + [(32, 16, 9)]]
    expected = tdconv.decompose_batch([w.cuda() for w in ws], "cp", 16, n_iter_max=20, seed=0, parallel=False)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xs = [w.cuda() * 1.0 for w in ws]  # written on the caller's stream
        got = tdconv.decompose_batch(xs, "cp", 16, n_iter_max=20, seed=0, parallel=True)
        kernels = [tdconv.reference.cp_to_tensor(c.weights, c.factors) for c in got]
    stream.synchronize()
    for k, e in zip(kernels, expected):
        torch.testing.assert_close(k, tdconv.reference.cp_to_tensor(e.weights, e.factors), rtol=1e-4, atol=1e-4)


@cuda
def test_cuda_aten_solve_matches_reference(require_ext):
    # The triangular solves the CUDA engine paths run (cuSOLVER Cholesky, cuBLAS trsm), at and beyond the
    # fused limit, for batches of 1 (looped potrf), 3 and 12 (batched trsm): eager, then captured in a
    # CUDA graph and replayed on new operands written into the captured inputs.
    _cuda_ready()
    for b in (1, 3, 12):
        for r, i in [(16, 9), (96, 40), (256, 512)]:
            for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 2e-3)]:
                grams, m = _solve_operands(b, i, r, 2, dtype)
                g_dev, m_dev = [g.cuda() for g in grams], m.cuda()
                u, lam = torch.ops.tdconv._cp_solve(g_dev, m_dev, 0.5, True)
                u_ref, lam_ref = _solve_reference(grams, m, 0.5)
                assert u.is_cuda and _rel(u.cpu(), u_ref) < tol and _rel(lam.cpu(), lam_ref) < tol, (b, dtype, r)
                if dtype != torch.float32:
                    continue
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture (handles, workspaces)
                    torch.ops.tdconv._cp_solve(g_dev, m_dev, 0.5, True)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    u_g, lam_g = torch.ops.tdconv._cp_solve(g_dev, m_dev, 0.5, True)
                grams2, m2 = _solve_operands(b, i, r, 2, dtype, seed=1)
                for dst, src in zip(g_dev, grams2):
                    dst.copy_(src)
                m_dev.copy_(m2)
                graph.replay()
                torch.cuda.synchronize()
                u_ref, lam_ref = _solve_reference(grams2, m2, 0.5)
                assert _rel(u_g.cpu(), u_ref) < tol and _rel(lam_g.cpu(), lam_ref) < tol, ("graph", b, r)
    _check_failed_member_is_nan(lambda g, m: torch.ops.tdconv._cp_solve(g, m, 0.0, True), "cuda")


@cuda
def test_cuda_small_solve_in_cp_als(require_ext, monkeypatch):
    # The fused small solve (TDCONV_CUDA_SMALL_SOLVE=1) gives the sweeps of the ATen path.
    _cuda_ready()
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(64, 64, 9, generator=g).cuda() for _ in range(3)]
    monkeypatch.delenv("TDCONV_CUDA_SMALL_SOLVE", raising=False)
    expected = tdconv.decompose_batch(ws, "cp", 32, n_iter_max=30, seed=0)
    monkeypatch.setenv("TDCONV_CUDA_SMALL_SOLVE", "1")
    solves = _stats()["small_solves"]
    got = tdconv.decompose_batch(ws, "cp", 32, n_iter_max=30, seed=0)
    assert _stats()["small_solves"] > solves, "the fused small solve did not run"
    for a, b in zip(got, expected):
        assert abs(a.rel_error - b.rel_error) < 1e-4
        torch.testing.assert_close(tdconv.reference.cp_to_tensor(a.weights, a.factors),
                                   tdconv.reference.cp_to_tensor(b.weights, b.factors), rtol=1e-3, atol=1e-3)


@cuda
@pytest.mark.parametrize("rank", [8, 80])
def test_cuda_graph_sweeps_in_cp_als(require_ext, monkeypatch, rank):
    # Sweeps replayed from a CUDA graph (TDCONV_CUDA_GRAPHS=1) are the eager sweeps with the same solve:
    # same errors, same sweep counts, same factors. Rank 8 captures the fused small solve, with members
    # that converge early and are frozen; rank 80 (above its limit of 64) ATen's Cholesky and triangular
    # solves.
    _cuda_ready()
    g = torch.Generator().manual_seed(0)
    shape = (32, 24, 9) if rank <= 64 else (96, 96, 9)
    planted = [tdconv.reference.cp_to_tensor(torch.ones(rank, dtype=torch.float64),
                                             [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape])
               for _ in range(2)]
    ws = [w.float().cuda() for w in planted] + [torch.randn(*shape, generator=g).cuda()]
    monkeypatch.setenv("TDCONV_CUDA_SMALL_SOLVE", "1")
    monkeypatch.delenv("TDCONV_CUDA_GRAPHS", raising=False)
    expected = tdconv.decompose_batch(ws, "cp", rank, n_iter_max=60, seed=0)
    monkeypatch.setenv("TDCONV_CUDA_GRAPHS", "1")
    before = _stats()
    got = tdconv.decompose_batch(ws, "cp", rank, n_iter_max=60, seed=0)
    after = _stats()
    assert after["graph_captures"] == before["graph_captures"] + 1, after  # one shape group, one capture
    assert after["graph_capture_failures"] == before["graph_capture_failures"]
    assert after["graph_replays"] > before["graph_replays"]
    if rank == 8:  # the planted members converge early and are frozen while the third runs on
        assert min(a.n_iter for a in got[:2]) < 60, [a.n_iter for a in got]
    for a, b in zip(got, expected):
        assert a.n_iter == b.n_iter
        torch.testing.assert_close(torch.as_tensor(a.errors), torch.as_tensor(b.errors), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(tdconv.reference.cp_to_tensor(a.weights, a.factors),
                                   tdconv.reference.cp_to_tensor(b.weights, b.factors), rtol=1e-4, atol=1e-4)


def test_no_cuda_test_runs_without_a_gpu(request):
    # The CUDA tests above carry the `cuda` mark, which conftest skips without a GPU, and `cuda` in
    # their names, so that `pytest -k cuda` (benchmarks/gpu_check.sh, stage 1) selects them.
    names = [n for n in globals() if n.startswith("test_cuda_")]
    assert len(names) == 7
    for n in names:
        assert any(m.name == "cuda" for m in getattr(globals()[n], "pytestmark", []))
