"""Data-aware fits: each factorised layer fitted to what the network computes on calibration inputs.

For a conv with kernel ``W`` (``C_out x d``, ``d = C_in kh kw``), input patches ``p`` (im2col with the
layer's own padding, stride and dilation) and the scale ``D`` of the BatchNorm that follows it
(``gamma / sqrt(var + eps)``, identity when there is none), the error the network sees is
``E||D (W p_t - W^ p_s)||^2``: ``p_t`` are the patches of the dense model's input to the layer, ``p_s``
those of the already compressed model (sequential reconstruction, Zhang et al., TPAMI 2016). It
depends on the data only through second moments, accumulated in float64 over streamed batches (each chunk's product in the model's
precision, at least float32):
``S_ss = E[p_s p_s^T]``, ``S_ts = E[p_t p_s^T]`` (``(d + 1)^2`` each, a constant appended for the bias)
and the dense responses' ``E[y y^T]`` (``C_out^2``). Memory is bounded by one layer's moments at a time.

- Tucker-2: the output factor is spanned by the leading eigenvectors of ``D E[y y^T] D``; the input
  factor by the leading directions of the unconstrained optimum ``B* = U^T D W S_ts S_ss^-1`` in the
  metric of the channel covariance (its Cholesky factor ``L``: truncated SVD of ``L^T B*_(in)``, mapped
  back by ``L^-T``); the core in closed form by least squares given both; the last 1x1 (and bias) by
  least squares given the rest.
- CP: CP-ALS of the kernel with the taps that only ever read padding masked out (they have no
  variance, so no rank is spent on them), then alternating closed-form least-squares refits of the
  depthwise factors and of the last 1x1 (and bias) in the metric above; component norms rebalanced
  as :meth:`tdconv.FactorizedConv2d.from_conv` does. cp4 gets the last-factor refit only.

Every refit lowers the calibration error of the layer it starts from, and the kernel fit is kept
where it is better (the report says which fit each layer got, with its output error on the
calibration images and on a held-out part of them). Ridges are relative to the mean eigenvalue of
the matrix they regularise.
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import ConvGeometry

__all__ = ["CalibrationWarning", "prepare_calibration", "Moments", "LayerFit", "patches", "bn_scale_after",
           "fit_tucker", "fit_cp", "fit_svd", "refit_last", "output_error", "data_tails", "module_input", "model_output_error",
           "reestimate_batchnorm"]

RIDGE = 1e-5           # relative ridge of the least-squares solves (float32 patches; 1e-9 for float64 ones)
HELD_OUT = 0.125       # fraction of the calibration images held out to measure the fits
REFINE_LR = 1e-4       # Adam's step size of the block refinement
CHUNK = 1 << 23        # patch-matrix elements unfolded at once (an image more where one is larger)
MAX_FIT_DIM = 8192     # input dimension (C_in kh kw) above which a layer gets the kernel fit: its float64 moments
                       # (two d x d matrices, 1 GiB at 8192) and their solves grow with d^2 and d^3


class CalibrationWarning(UserWarning):
    """A calibration set too small for what it estimates (the fit is regularised and still runs)."""


# ------------------------------------------------------------------------------------------------ inputs
def _first_tensor(item, index):
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]  # (inputs, labels): the labels are not used
    raise TypeError(f"calibration batch {index} must be a tensor [N, C, H, W] or an (inputs, labels) tuple, got "
                    f"{type(item).__name__}")


def prepare_calibration(data, *, channels: int, device, dtype, batch_size: int = 256) -> tuple:
    """``(fit batches, held-out batches)`` from ``data``: a tensor ``[N, C, H, W]`` or an iterable of
    batches (tensors or ``(inputs, labels)`` tuples; labels ignored), read once and kept where they are
    (an iterable is drawn once: the fits read the set once per layer); each batch is moved to the
    model's ``device`` and cast to its floating ``dtype`` when it is used. The last ``HELD_OUT`` of the
    images (at least one, when there are 8 or more) are held out. Raises ``ValueError`` / ``TypeError`` naming the
    problem (an empty set, a wrong shape or channel count, a non-floating dtype, non-finite values)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"calibration must be a tensor [N, C, H, W], got shape {tuple(data.shape)}")
        items = list(data.split(batch_size)) if data.shape[0] else []
    else:
        try:
            items = list(data)
        except TypeError:
            raise TypeError(f"calibration must be a tensor [N, C, H, W] or an iterable of batches, got "
                            f"{type(data).__name__}") from None
    batches = []
    for i, item in enumerate(items):
        x = _first_tensor(item, i)
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"calibration batch {i} must be [N, C, H, W] with N >= 1, got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"calibration batch {i} has {x.shape[1]} channels; the model's input has {channels} "
                             "(input_size[0])")
        if not x.is_floating_point():
            raise TypeError(f"calibration inputs must be floating point (normalised as the model sees them), got "
                            f"{x.dtype} in batch {i}")
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"calibration batch {i} holds non-finite values")
        batches.append(x)
    n = sum(b.shape[0] for b in batches)
    if n == 0:
        raise ValueError("calibration holds no images")
    held = max(1, round(HELD_OUT * n)) if n >= 8 else 0
    fit, out, seen = [], [], 0
    for b in batches:
        cut = min(b.shape[0], max(0, n - held - seen))
        if cut:
            fit.append(b[:cut])
        if cut < b.shape[0]:
            out.append(b[cut:])
        seen += b.shape[0]
    return _Batches(fit, device, dtype), _Batches(out, device, dtype)


class _Batches:
    """Calibration batches, kept where they were given and moved to the model's device and dtype one
    at a time as they are used (the set is read once per layer)."""

    def __init__(self, batches: list, device, dtype):
        self.batches, self.device, self.dtype = batches, device, dtype

    def __iter__(self):
        for x in self.batches:
            yield x.to(device=self.device, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.batches)

    def first(self) -> torch.Tensor:
        return self.batches[0][:1].to(device=self.device, dtype=self.dtype)

    def images(self) -> int:
        return sum(b.shape[0] for b in self.batches)


class _Reached(BaseException):
    """Stops a forward once the hooked module is reached (not an Exception: a model's own
    ``except Exception`` must not swallow it)."""


def module_input(model: nn.Module, module: nn.Module, x: torch.Tensor, *, output: bool = False) -> torch.Tensor:
    """The input (``output=True``: the output) of ``module`` when ``model`` runs ``x``; the forward
    stops there."""
    seen = []

    def hook(mod, inputs, *result):
        seen.append((result[0] if output else inputs[0]).detach())
        raise _Reached

    handle = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Reached:
        pass
    except Exception as exc:
        raise RuntimeError(f"the model's forward failed on the calibration data: {type(exc).__name__}: {exc}") \
            from exc
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"module {type(module).__name__} is not reached by the model's forward on the calibration "
                         "data")
    return seen[0]


def bn_scale_after(model: nn.Module, names: list, x: torch.Tensor) -> dict:
    """``{name: D}`` for each named conv whose output goes straight into a BatchNorm2d (the very tensor,
    unmodified in between; ``D`` the BatchNorm's eval scale ``gamma / sqrt(running_var + eps)``, float64);
    other convs are absent."""
    modules = dict(model.named_modules())
    outputs, found, handles = [], {}, []

    def after_conv(name):
        def hook(mod, inputs, output):
            outputs.append((name, output, output._version))
        return hook

    def before_bn(bn):
        def hook(mod, inputs):
            for name, out, version in outputs:
                if inputs[0] is out and out._version == version and name not in found \
                        and bn.num_features == ConvGeometry.of(modules[name]).out_channels:
                    w = bn.weight.detach().double() if bn.weight is not None else 1.0
                    found[name] = (w / torch.sqrt(bn.running_var.detach().double() + bn.eps)
                                   if bn.running_var is not None else None)
        return hook

    for name in names:
        handles.append(modules[name].register_forward_hook(after_conv(name)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(before_bn(m)))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return {n: d for n, d in found.items() if d is not None}


def _as_images(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A linear layer's input ``[..., in]`` as the ``[rows, in, 1, 1]`` images of its 1x1 conv; a conv's
    as it is."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1, 1)
    return x


def patches(x: torch.Tensor, geometry) -> torch.Tensor:
    """``[N * L, C_in kh kw]``: the im2col patches a conv of ``geometry`` reads from ``x`` (its own
    padding, padding mode, stride and dilation), in the order of ``weight.reshape(C_out, -1)``."""
    pad = geometry.explicit_pad
    if pad is not None:
        x = F.pad(x, pad, mode="constant" if geometry.padding_mode == "zeros" else geometry.padding_mode)
        padding = (0, 0)
    else:
        padding = geometry.symmetric_padding
    cols = F.unfold(x, geometry.kernel_size, dilation=geometry.dilation, padding=padding, stride=geometry.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


# ------------------------------------------------------------------------------------------------ moments
class Moments:
    """Second moments of one conv's augmented patches (``[p, 1]``) and dense responses, in float64.

    ``ss = sum p_s p_s^T``, ``ts = sum p_t p_s^T`` (None while every student input equals the teacher's),
    ``yy = sum y y^T`` of the dense responses ``y = W p_t + b``; ``n`` patches. Each block of about
    ``CHUNK`` patch elements is multiplied in the inputs' precision (float32, or float64 for a float64
    model) and added to float64 sums.
    """

    def __init__(self, weight: torch.Tensor, bias, geometry):
        self.geometry = geometry
        c_out = weight.shape[0]
        w = weight.detach().reshape(c_out, -1).double()
        b = bias.detach().double()[:, None] if bias is not None else w.new_zeros(c_out, 1)
        self.w_aug = torch.cat([w, b], 1)  # [C_out, d + 1]
        d1 = self.w_aug.shape[1]
        self.ss = w.new_zeros(d1, d1)
        self.ts = None
        self.yy = w.new_zeros(c_out, c_out)
        self.n = 0
        self.ridge = RIDGE

    @property
    def d(self) -> int:
        return self.w_aug.shape[1] - 1

    def add(self, x_t: torch.Tensor, x_s: torch.Tensor | None) -> None:
        """Accumulate one batch of layer inputs (``x_s`` None: the student's input is the teacher's).
        The batch is unfolded a few images at a time, so that at most about ``CHUNK`` patch elements
        exist at once."""
        if x_s is not None and self.ts is None:
            self.ts = self.ss.clone()  # every earlier batch had equal inputs
        g = self.geometry
        per_image = (self.d + 1) * g.output_size(tuple(x_t.shape[2:]))[0] * g.output_size(tuple(x_t.shape[2:]))[1]
        step = max(1, CHUNK // max(1, per_image))
        dt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        if dt == torch.float32:
            self.ridge = RIDGE
        elif self.n == 0:
            self.ridge = 1e-9
        w = self.w_aug.to(dt)
        for i in range(0, x_t.shape[0], step):
            pt = self._aug(patches(x_t[i:i + step], g), dt)
            y = pt @ w.T
            self.yy += (y.T @ y).double()
            if x_s is None:
                gram = (pt.T @ pt).double()
                self.ss += gram
                if self.ts is not None:
                    self.ts += gram
            else:
                ps = self._aug(patches(x_s[i:i + step], g), dt)
                self.ss += (ps.T @ ps).double()
                self.ts += (pt.T @ ps).double()
            self.n += pt.shape[0]

    @staticmethod
    def _aug(p, dtype):
        p = p.to(dtype)
        return torch.cat([p, p.new_ones(p.shape[0], 1)], 1)

    def finish(self, name: str) -> "Moments":
        """Means instead of sums; ``ValueError`` naming the layer when they are not finite."""
        if self.n == 0:
            raise ValueError(f"layer {name!r} saw no calibration patches")
        for t in (self.ss, self.ts, self.yy):
            if t is not None:
                t /= self.n
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"the activations reaching layer {name!r} on the calibration data are not "
                                     "finite")
        return self

    @property
    def cross(self) -> torch.Tensor:
        """``E[p_t p_s^T]`` (augmented)."""
        return self.ss if self.ts is None else self.ts

    @property
    def target(self) -> torch.Tensor:
        """``E[y p_s^T]`` ``[C_out, d + 1]``: the dense responses against the student's patches."""
        if getattr(self, "_target", None) is None:
            self._target = self.w_aug @ self.cross
        return self._target

    def live_dims(self) -> int:
        return int((self.ss.diagonal()[:-1] > 0).sum())


# ------------------------------------------------------------------------------------------------ solves
def _ridge(mat: torch.Tensor, rel: float = RIDGE) -> torch.Tensor:
    scale = float(mat.diagonal().mean()) if mat.numel() else 0.0
    return mat + (rel * scale if scale > 0 else 1e-30) * torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)


def _solve_right(rhs: torch.Tensor, mat: torch.Tensor, rel: float = RIDGE) -> torch.Tensor:
    """``rhs @ (mat + ridge)^-1`` for a symmetric positive semi-definite ``mat``. Sums of float32 products
    can leave ``mat`` slightly indefinite; the ridge then grows tenfold until the Cholesky factorisation
    succeeds (at most to 0.1 of the mean eigenvalue), and an eigendecomposition solves what is left."""
    mat = 0.5 * (mat + mat.T)
    while rel <= 0.1:
        chol, info = torch.linalg.cholesky_ex(_ridge(mat, rel))
        if int(info) == 0:
            return torch.cholesky_solve(rhs.T, chol).T
        rel *= 10.0
    ev, vecs = torch.linalg.eigh(mat)
    floor = 1e-12 * float(ev.abs().max()) if ev.numel() else 0.0
    inv = torch.where(ev > floor, 1.0 / ev.clamp_min(floor if floor > 0 else 1e-300), torch.zeros_like(ev))
    return ((rhs @ vecs) * inv) @ vecs.T


def _whitener(cov: torch.Tensor, rel: float) -> torch.Tensor:
    """A lower-triangular ``L`` with ``L L^T = cov + ridge`` (the ridge grown as in :func:`_solve_right`)."""
    cov = 0.5 * (cov + cov.T)
    while rel <= 0.1:
        chol, info = torch.linalg.cholesky_ex(_ridge(cov, rel))
        if int(info) == 0:
            return chol
        rel *= 10.0
    # Still indefinite: the diagonal alone (per-channel scaling) is a valid, if cruder, metric.
    diag = cov.diagonal().clamp_min(0)
    return torch.diag(torch.sqrt(diag + max(float(diag.mean()), 1e-300) * 0.1))


def _scale(d_scale, c_out, like):
    return torch.ones(c_out, dtype=torch.float64, device=like.device) if d_scale is None else d_scale.to(like.device)


def output_error(m: Moments, kernel_aug: torch.Tensor, d_scale=None) -> float:
    """``sqrt(E||D (y - y^)||^2 / E||D y||^2)`` of the layer ``y^ = kernel_aug [p_s, 1]`` (``kernel_aug``
    ``[C_out, d + 1]``: the flattened kernel and the bias) against the dense responses."""
    dd = _scale(d_scale, m.yy.shape[0], m.yy).square()
    k = kernel_aug.double()
    total = float((dd * m.yy.diagonal()).sum())
    cross = float((dd[:, None] * m.target * k).sum())
    own = float((dd[:, None] * (k @ m.ss) * k).sum())
    if total <= 0:
        return 0.0 if own <= 0 else float("inf")
    return math.sqrt(max(total - 2.0 * cross + own, 0.0) / total)


# ------------------------------------------------------------------------------------------------ fits
class LayerFit:
    """A fitted factorised layer's parameters (float64): ``first`` [R_in, C_in], ``spatial`` (Tucker:
    [R_out, R_in, kh kw]; CP: [R, kh kw]; cp4: ([R, kh], [R, kw]); SVD: None), ``last`` [C_out, R_out],
    ``bias``."""

    def __init__(self, method, first, spatial, last, bias, kernel_size):
        self.method, self.first, self.spatial, self.last, self.bias = method, first, spatial, last, bias
        self.kernel_size = tuple(kernel_size)

    def middle(self) -> torch.Tensor:
        """``[R_out, C_in, kh kw]``: the kernel of everything before the last 1x1."""
        if self.method == "svd":
            return self.first[:, :, None]
        if self.method == "tucker":
            return torch.einsum("orj,rc->ocj", self.spatial, self.first)
        if self.method == "cp4":
            sh, sw = self.spatial
            s = (sh[:, :, None] * sw[:, None, :]).reshape(sh.shape[0], -1)
        else:
            s = self.spatial
        return self.first[:, :, None] * s[:, None, :]

    def kernel_aug(self, c_out) -> torch.Tensor:
        k = self.last @ self.middle().reshape(self.last.shape[1], -1)
        b = self.bias if self.bias is not None else k.new_zeros(c_out)
        return torch.cat([k, b[:, None]], 1)

    def rebalance(self) -> "LayerFit":
        """CP: each component's factors given equal norms (the function is unchanged)."""
        if self.method == "tucker":
            return self
        parts = [self.last.T, self.first] + ([] if self.method == "svd" else [self.spatial] if self.method == "cp"
                                             else list(self.spatial))
        norms = torch.stack([p.norm(dim=1) for p in parts])  # [N, R]
        prod = norms.prod(0)
        target = prod.clamp_min(1e-300) ** (1.0 / len(parts))
        scales = [torch.where(n > 0, target / n.clamp_min(1e-300), torch.ones_like(n)) for n in norms]
        self.last = self.last * scales[0][None, :]
        self.first = self.first * scales[1][:, None]
        if self.method == "cp":
            self.spatial = self.spatial * scales[2][:, None]
        elif self.method == "cp4":
            self.spatial = (self.spatial[0] * scales[2][:, None], self.spatial[1] * scales[3][:, None])
        return self

    def parameters_for(self, layer) -> dict:
        """The layer's parameters (shapes and dtype of ``layer``)."""
        kh, kw = self.kernel_size
        like = layer.first
        out = {"first": self.first.reshape(layer.first.shape), "last": self.last.reshape(layer.last.shape)}
        if self.method == "svd":
            pass
        elif self.method == "tucker":
            out["spatial"] = self.spatial.reshape(self.spatial.shape[0], self.spatial.shape[1], kh, kw)
        elif self.method == "cp4":
            out["spatial"] = self.spatial[0].reshape(-1, 1, kh, 1)
            out["spatial_w"] = self.spatial[1].reshape(-1, 1, 1, kw)
        else:
            out["spatial"] = self.spatial.reshape(-1, 1, kh, kw)
        out = {k: v.to(dtype=like.dtype, device=like.device) for k, v in out.items()}
        if layer.bias is not None:
            b = self.bias if self.bias is not None else torch.zeros(layer.bias.shape[0], dtype=torch.float64)
            out["bias"] = b.to(dtype=like.dtype, device=like.device)
        return out

    @classmethod
    def of_layer(cls, layer) -> "LayerFit":
        """The parameters of a :class:`tdconv.FactorizedConv2d` as a fit."""
        f = lambda t: t.detach().double()  # noqa: E731
        first, last = f(layer.first).flatten(1), f(layer.last).flatten(1)
        if layer.method == "svd":
            spatial = None
        elif layer.method == "tucker":
            spatial = f(layer.spatial).flatten(2)
        elif layer.method == "cp4":
            spatial = (f(layer.spatial).flatten(1), f(layer.spatial_w).flatten(1))
        else:
            spatial = f(layer.spatial).flatten(1)
        bias = f(layer.bias) if layer.bias is not None else None
        return cls(layer.method, first, spatial, last, bias, getattr(layer, "kernel_size", (1, 1)))


def refit_last(fit: LayerFit, m: Moments, with_bias: bool) -> LayerFit:
    """The last 1x1 (and the bias, when the layer has one) by least squares given the rest of the layer.
    Each output channel is its own problem, so the BatchNorm scale does not enter."""
    mid = fit.middle().reshape(fit.last.shape[1], -1).to(m.ss)  # [R, d]
    r, d = mid.shape
    z = torch.zeros(r + 1 if with_bias else r, d + 1, dtype=m.ss.dtype, device=m.ss.device)
    z[:r, :d] = mid
    if with_bias:
        z[r, d] = 1.0
    zz = z @ m.ss @ z.T
    yz = m.target @ z.T
    sol = _solve_right(yz, zz, m.ridge)
    fit.last = sol[:, :r]
    fit.bias = sol[:, r] if with_bias else None
    return fit


def _tap_covariance(m: Moments, c_in: int, taps: int) -> torch.Tensor:
    s = m.ss[:-1, :-1].reshape(c_in, taps, c_in, taps)
    return s.diagonal(dim1=1, dim2=3).sum(-1)  # [C_in, C_in]


def fit_tucker(m: Moments, ranks: tuple, d_scale, with_bias: bool) -> LayerFit:
    """The data-aware Tucker-2 fit at ``ranks = (R_out, R_in)`` (see the module's docstring)."""
    r_out, r_in = ranks
    g = m.geometry
    c_out, c_in = g.out_channels, g.in_channels
    taps = g.kernel_size[0] * g.kernel_size[1]
    dsc = _scale(d_scale, c_out, m.ss)
    ev, vecs = torch.linalg.eigh(dsc[:, None] * m.yy * dsc[None, :])
    u = vecs[:, ev.argsort(descending=True)[:r_out]]              # [C_out, R_out]
    s = m.ss[:-1, :-1]
    rhs = (u.T @ (dsc[:, None] * m.target))[:, :-1]               # E[(U^T D y) p_s^T]
    b_star = _solve_right(rhs, s, m.ridge)                                  # [R_out, d]
    chol = _whitener(_tap_covariance(m, c_in, taps), m.ridge)
    unf = b_star.reshape(r_out, c_in, taps).permute(1, 0, 2).reshape(c_in, -1)
    # full_matrices where R_in exceeds R_out kh kw: the extra directions carry no energy, any will do.
    left = torch.linalg.svd(chol.T @ unf, full_matrices=r_in > min(unf.shape))[0][:, :r_in]
    v = torch.linalg.solve_triangular(chol.T, left, upper=True)
    v = torch.linalg.qr(v)[0]                                      # [C_in, R_in]
    s4 = s.reshape(c_in, taps, c_in, taps)
    sa = torch.einsum("cr,cjdl,ds->rjsl", v, s4, v).reshape(r_in * taps, r_in * taps)
    ra = torch.einsum("ocj,cr->orj", rhs.reshape(r_out, c_in, taps), v).reshape(r_out, r_in * taps)
    core = _solve_right(ra, sa, m.ridge).reshape(r_out, r_in, taps)
    fit = LayerFit("tucker", v.T.contiguous(), core, u, None, g.kernel_size)
    return refit_last(fit, m, with_bias)


def fit_svd(m: Moments, rank: int, d_scale, with_bias: bool) -> LayerFit:
    """The data-aware rank-``rank`` fit of a 1x1 conv or linear layer: the output factor spans the
    leading eigenvectors of ``D E[y y^T] D`` (the subspace that keeps most of the BatchNorm-scaled
    response energy), the input factor is the least-squares map of the student's inputs onto the
    responses' coordinates in it, then the last factor (and bias) by least squares given the first."""
    c_out = m.yy.shape[0]
    dsc = _scale(d_scale, c_out, m.ss)
    ev, vecs = torch.linalg.eigh(dsc[:, None] * m.yy * dsc[None, :])
    u = vecs[:, ev.argsort(descending=True)[:rank]]               # [C_out, R]
    rhs = (u.T @ (dsc[:, None] * m.target))[:, :-1]               # E[(U^T D y) p_s^T]
    first = _solve_right(rhs, m.ss[:-1, :-1], m.ridge)             # [R, C_in]
    fit = LayerFit("svd", first, None, u, None, (1, 1))
    return refit_last(fit, m, with_bias).rebalance()


def fit_cp(m: Moments, start: LayerFit, d_scale, with_bias: bool, rounds: int = 2) -> LayerFit:
    """Closed-form refits of a CP layer ``start``: the depthwise factors (cp only) and the last 1x1 (and
    bias), ``rounds`` times in turn; each step lowers the calibration error."""
    g = m.geometry
    c_out, c_in = g.out_channels, g.in_channels
    taps = g.kernel_size[0] * g.kernel_size[1]
    fit = LayerFit(start.method, start.first.to(m.ss), start.spatial if start.method == "cp4" else
                   start.spatial.to(m.ss), start.last.to(m.ss), None if start.bias is None else start.bias.to(m.ss),
                   g.kernel_size)
    fit = refit_last(fit, m, with_bias)
    if fit.method != "cp":
        return fit.rebalance()
    dd = _scale(d_scale, c_out, m.ss).square()
    s4 = m.ss[:-1, :-1].reshape(c_in, taps, c_in, taps)
    r = fit.first.shape[0]
    for _ in range(rounds):
        f = fit.first
        q = torch.einsum("rc,cjdl,sd->rjsl", f, s4, f)                          # E[q q^T], q = (F x I) p_s
        mean_q = (f @ m.ss[:-1, -1].reshape(c_in, taps))                        # E[q] [R, taps]
        yq = torch.einsum("ocj,rc->orj", m.target[:, :-1].reshape(c_out, c_in, taps), f)
        if fit.bias is not None:
            yq = yq - fit.bias[:, None, None] * mean_q[None]
        ltd = fit.last.T * dd[None, :]                                          # [R, C_out]
        h = (ltd @ fit.last)[:, None, :, None] * q                              # [R, taps, R, taps]
        rhs = torch.einsum("ro,orj->rj", ltd, yq).reshape(1, -1)
        fit.spatial = _solve_right(rhs, h.reshape(r * taps, r * taps), m.ridge).reshape(r, taps)
        fit = refit_last(fit, m, with_bias)
    return fit.rebalance()


def data_tails(m: Moments, d_scale) -> tuple:
    """``(tail_out, tail_in)`` as :func:`tdconv.ranks.mode_tails` gives them, from the calibration data:
    the output-channel spectrum of the BatchNorm-scaled responses and the input-channel spectrum of the
    layer's unconstrained least-squares optimum in the metric of the channel covariance."""
    g = m.geometry
    c_out, c_in = g.out_channels, g.in_channels
    taps = g.kernel_size[0] * g.kernel_size[1]
    dsc = _scale(d_scale, c_out, m.ss)
    ev_out = torch.linalg.eigvalsh(dsc[:, None] * m.yy * dsc[None, :]).flip(0).clamp_min(0)
    b_star = _solve_right((dsc[:, None] * m.target)[:, :-1], m.ss[:-1, :-1], m.ridge)
    chol = _whitener(_tap_covariance(m, c_in, taps), m.ridge)
    unf = b_star.reshape(c_out, c_in, taps).permute(1, 0, 2).reshape(c_in, -1)
    ev_in = torch.linalg.svdvals(chol.T @ unf).square()
    tails = []
    for ev in (ev_out, ev_in):
        ev = ev.cpu()
        total = float(ev.sum())
        tail = torch.cat([ev.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        tails.append(tail / total if total > 0 else tail)
    return tuple(tails)


# ------------------------------------------------------------------------------------------------ whole model
def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    return []


def model_output_error(student: nn.Module, teacher_outputs: list, batches: list) -> float:
    """``||f_s - f_t||^2 / ||f_t||^2`` of the model outputs over ``batches``."""
    num = den = 0.0
    with torch.no_grad():
        for x, ref in zip(batches, teacher_outputs):
            for a, b in zip(_leaves(student(x)), ref):
                num += float((a.double() - b.double()).square().sum())
                den += float(b.double().square().sum())
    return num / den if den > 0 else 0.0


def reestimate_batchnorm(model: nn.Module, batches: list) -> None:
    """Every BatchNorm's running statistics re-estimated on ``batches`` (cumulative average; no weight
    changes); the model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
            m.eval()


def check_sample_count(name: str, m: Moments) -> None:
    """Warn (with the numbers) when a layer saw fewer patches than its covariance has live dimensions."""
    live = m.live_dims()
    if m.n < live:
        warnings.warn(f"layer {name!r}: {m.n} calibration patches for a {live}-dimensional input covariance; the "
                      "fit is regularised (ridge), more calibration images would make it better determined",
                      CalibrationWarning, stacklevel=5)


def positive_steps(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------ the driver
class SequentialFit:
    """Fits the selected convs of ``teacher`` one after another in forward order on calibration data.

    ``teacher`` is only run (in eval mode, its training flags restored afterwards), never modified;
    the student is a deep copy into which the fitted layers are placed as they are made.
    """

    def __init__(self, teacher: nn.Module, names: list, calibration, *, input_size: tuple, sequential: bool = True,
                 refine_steps: int = 0, reestimate_bn="auto", seed: int = 0):
        self.refine_steps = refine_steps  # checked by compress
        p = next(teacher.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        self.fit_batches, self.held_batches = prepare_calibration(calibration, channels=input_size[0], device=device,
                                                                  dtype=dtype)
        self.teacher, self.sequential, self.reestimate_bn, self.seed = teacher, sequential, reestimate_bn, seed
        self.images, self.held_images = self.fit_batches.images(), self.held_batches.images()
        sizes = sorted({tuple(b.shape[2:]) for b in self.fit_batches.batches + self.held_batches.batches})
        if sizes != [tuple(input_size[1:])]:
            warnings.warn(f"the calibration images are {sizes} (H, W), input_size is {tuple(input_size[1:])}: the "
                          "fits are made for the calibration resolution (which kernel taps only read padding depends "
                          "on it), the report's MACs and any budget are counted at input_size", CalibrationWarning,
                          stacklevel=3)
        self.modules = dict(teacher.named_modules())
        self._flags = {n: m.training for n, m in teacher.named_modules()}
        teacher.eval()
        try:
            calls = self._forward_calls(names)
            self.scales = bn_scale_after(teacher, list(calls), self.fit_batches.first())
        except BaseException:
            self.restore_teacher()
            raise
        self.order = [n for n, c in calls.items() if c == 1]  # forward order
        # Layers the data cannot fit: the kernel fit, with the reason.
        self.kernel_only = {n: "not reached by the calibration data" for n in names if n not in calls}
        grouped = [n for n, c in calls.items() if c == 1 and getattr(self.modules[n], "groups", 1) > 1]
        self.kernel_only.update({n: "grouped convolution; data-aware fits cover ungrouped convs, 1x1 convs and "
                                    "linear layers" for n in grouped})
        large = [n for n, c in calls.items() if c == 1 and n not in self.kernel_only
                 and ConvGeometry.of(self.modules[n]).in_channels * math.prod(
                     ConvGeometry.of(self.modules[n]).kernel_size) > MAX_FIT_DIM]
        self.kernel_only.update({n: f"more than {MAX_FIT_DIM} inputs per output (C_in kh kw), beyond what a "
                                    "data-aware fit keeps moments of" for n in large})
        self.order = [n for n in self.order if n not in self.kernel_only]
        self.kernel_only.update({n: f"called {c} times per forward (shared); fitted to its kernel"
                                 for n, c in calls.items() if c > 1})

    def restore_teacher(self) -> None:
        for n, m in self.teacher.named_modules():
            if n in self._flags:
                m.training = self._flags[n]

    def _forward_calls(self, names: list) -> dict:
        """``{name: calls per forward}`` of the selected layers reached, in the order they are first called."""
        calls, handles = {}, []
        for name in names:
            handles.append(self.modules[name].register_forward_pre_hook(
                lambda mod, inputs, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)))
        try:
            with torch.no_grad():
                self.teacher(self.fit_batches.first())
        except Exception as exc:
            raise RuntimeError(f"the model's forward failed on the calibration data: {type(exc).__name__}: {exc}") \
                from exc
        finally:
            for h in handles:
                h.remove()
        return calls

    @torch.no_grad()
    def moments(self, name: str, student: nn.Module | None, batches: list) -> Moments:
        """The moments of layer ``name`` over ``batches`` (``student`` None: the teacher's inputs only)."""
        conv = self.modules[name]
        m = Moments(conv.weight, conv.bias, ConvGeometry.of(conv))
        s_conv = dict(student.named_modules())[name] if student is not None else None
        for x in batches:
            x_t = _as_images(module_input(self.teacher, conv, x), conv)
            x_s = None
            if s_conv is not None:
                x_s = _as_images(module_input(student, s_conv, x), conv)
                if torch.equal(x_s, x_t):
                    x_s = None
            m.add(x_t, x_s)
        return m.finish(name)

    def drop(self, names: list) -> None:
        """Layers no longer to be fitted (left dense)."""
        self.order = [n for n in self.order if n not in names]
        for n in names:
            self.kernel_only.pop(n, None)

    def tails(self, names: list) -> dict:
        """``{name: data tails}`` for the budget allocator, from the teacher's inputs."""
        out = {}
        for name in names:
            if name in self.order:
                out[name] = data_tails(self.moments(name, None, self.fit_batches), self.scales.get(name))
        return out

    # ---------------------------------------------------------------------------------------- refinement
    def _block_data(self, block_name, student, batches):
        t_block, s_block = self.modules[block_name], dict(student.named_modules())[block_name]
        xs, ys = [], []
        with torch.no_grad():
            for x in batches:
                xs.append(module_input(student, s_block, x))
                ys.append(module_input(self.teacher, t_block, x, output=True))
        return s_block, xs, ys

    @staticmethod
    def _block_error(block, xs, ys) -> float:
        num = den = 0.0
        with torch.no_grad():
            for x, y in zip(xs, ys):
                num += float((block(x).double() - y.double()).square().sum())
                den += float(y.double().square().sum())
        return num / den if den > 0 else 0.0

    def refine(self, block_name: str, student: nn.Module) -> dict:
        """Adam on the block's output error; kept only where the held-out error goes down (skipped when
        nothing is held out). Only the block's factorised layers and BatchNorm affine parameters move;
        no parameter is left with a gradient or a changed ``requires_grad``."""
        from .nn import FactorizedConv2d, FactorizedLinear
        if not len(self.held_batches):
            return {"block": block_name, "steps": 0, "kept": False,
                    "reason": "no held-out images to check it on (fewer than 8 calibration images)"}
        block, xs, ys = self._block_data(block_name, student, self.fit_batches)
        _, hxs, hys = self._block_data(block_name, student, self.held_batches)
        params = [p for m in block.modules() if isinstance(m, (FactorizedConv2d, FactorizedLinear))
                  for p in m.parameters()]
        params += [p for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in (m.weight, m.bias) if p is not None]
        if not params:
            return {"block": block_name, "steps": 0, "kept": False, "reason": "nothing to refine"}
        before = self._block_error(block, hxs, hys)
        saved = copy.deepcopy(block.state_dict())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=REFINE_LR)
        gen = torch.Generator().manual_seed(self.seed)
        norms = [float(y.square().mean()) or 1.0 for y in ys]
        try:
            with torch.enable_grad():
                for _ in range(self.refine_steps):
                    i = int(torch.randint(len(xs), (1,), generator=gen))
                    loss = (block(xs[i]) - ys[i]).square().mean() / norms[i]
                    grads = torch.autograd.grad(loss, params)  # no .grad left on the block's other weights
                    for p, g in zip(params, grads):
                        p.grad = g
                    opt.step()
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
                p.grad = None
        after = self._block_error(block, hxs, hys)
        kept = after < before
        if not kept:
            block.load_state_dict(saved)
        return {"block": block_name, "steps": self.refine_steps, "held_out_error_before": before,
                "held_out_error_after": after, "kept": kept}

    # ---------------------------------------------------------------------------------------- BatchNorm
    def decide_batchnorm(self, student: nn.Module) -> dict:
        """Re-estimate BatchNorm statistics on the fit images where asked, or (``"auto"``) where that lowers
        the model's output error on the held-out images."""
        if self.reestimate_bn is False:
            return {"reestimated": False, "reason": "reestimate_bn=False"}
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                     for m in student.modules())
        if not has_bn:
            return {"reestimated": False, "reason": "no BatchNorm"}
        if self.reestimate_bn is True:
            reestimate_batchnorm(student, self.fit_batches)
            return {"reestimated": True, "reason": "reestimate_bn=True"}
        if not len(self.held_batches):
            return {"reestimated": False, "reason": "no held-out images to decide on (fewer than 8 calibration "
                    "images): the statistics are kept"}
        with torch.no_grad():
            ref = [_leaves(self.teacher(x)) for x in self.held_batches]
        before = model_output_error(student, ref, self.held_batches)
        trial = copy.deepcopy(student)
        reestimate_batchnorm(trial, self.fit_batches)
        after = model_output_error(trial, ref, self.held_batches)
        if after < before:
            student.load_state_dict(trial.state_dict())
        return {"reestimated": after < before, "held_out_output_error": before, "held_out_output_error_reestimated":
                after}
