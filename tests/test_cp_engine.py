"""The CP engine ops called directly: what their results may and may not depend on."""
import pytest
import torch

import tdconv
from tdconv import reference as ref
from tdconv.decompose import _cp_init

from conftest import planted_cp


def _formula_error(x, w, fs):
    """The relative error from norms as the engine computes it before it switches to the explicit
    residual, (||X||^2 - 2 <X, X^> + ||X^||^2) / ||X||^2 in float64 from float32 factors and MTTKRP."""
    m = ref.unfold(x, x.dim() - 1) @ ref.khatri_rao(fs[:-1])
    lam = w.double()
    inner = ((m.double() * fs[-1].double()).sum(0) * lam).sum()
    v = torch.ones(w.shape[0], w.shape[0], dtype=x.dtype)
    for f in fs:
        v = v * (f.T @ f)
    norm_x2 = x.double().square().sum()
    return float(((norm_x2 - 2 * inner + lam @ v.double() @ lam).clamp_min(0) / norm_x2).sqrt())


def test_cp_als_result_does_not_depend_on_check_every(require_ext):
    # Three float32 tensors of exact CP rank 3 from random starts: member 0 converges within a few sweeps
    # to an error (~1e-6) far below what the norm formula resolves in float32 (~sqrt(eps) = 3e-4), so
    # the engine must switch it to the explicit residual; the others converge later or not at all.
    x = torch.stack([planted_cp((9, 8, 7), 3, torch.float32, seed=s) for s in range(3)])
    init = _cp_init(x, 3, "random", 0, True)
    runs = {ce: torch.ops.tdconv.cp_als(x, init, 60, 1e-7, 0.0, ce) for ce in (1, 3, 8)}
    w1, f1, e1, n1 = runs[1]
    assert n1[0] < 10 and n1[2] == 60  # one member stops early, one runs to the end
    for ce in (3, 8):
        w, fs, errs, n = runs[ce]
        assert torch.equal(n, n1), (ce, n.tolist(), n1.tolist())
        assert torch.equal(errs.nan_to_num(-1.0), e1.nan_to_num(-1.0)), ce
        assert torch.equal(w, w1) and all(torch.equal(a, b) for a, b in zip(fs, f1)), ce

    # The switch did happen: for the converged members the recorded final error is the explicit
    # residual of the returned factors, which the norm formula misses by far more.
    for b in (0, 1):
        assert n1[b] < 60
        xb, wb, fb = x[b], w1[b], [f[b] for f in f1]
        explicit = float(torch.linalg.vector_norm(xb.double() - ref.cp_to_tensor(wb.double(), [f.double() for f in fb]))
                         / torch.linalg.vector_norm(xb.double()))
        recorded = float(e1[b, n1[b] - 1])
        assert explicit < 1e-5 and abs(recorded - explicit) < 1e-7, (b, recorded, explicit)
        assert abs(_formula_error(xb, wb, fb) - explicit) > 5e-7, b
