"""Containers of decompositions: :class:`CPTensor` and :class:`TuckerTensor`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import reference as _ref

__all__ = ["CPTensor", "TuckerTensor"]


@dataclass
class CPTensor:
    """A CP (canonical polyadic) decomposition ``sum_r weights[r] * factors[0][:, r] o factors[1][:, r] o ...``.

    Attributes
    ----------
    weights : Tensor [R]
        Component weights; the factors' columns have unit norm.
    factors : list of Tensor [I_n, R]
        One factor per mode.
    errors : list of float
        Relative error ``||X - X^|| / ||X||`` after every sweep (ALS, or EPC after :func:`cp_epc`).
    n_iter : int
        Number of sweeps run.
    rel_error : float
        Final relative error, computed from the rebuilt tensor.
    tensor_norm : float
        ``||X||`` of the decomposed tensor (for the diagnostics below).
    norm_history : list of float
        After :func:`cp_epc`: ``sum(weights^2) / ||X||^2`` after every EPC sweep (else empty).

    Diagnostics (degenerate CP solutions have huge components that cancel each other):
    :attr:`component_norms`, :attr:`norm_ratio`, :attr:`sensitivity`, :meth:`diagnostics`.
    """

    weights: torch.Tensor
    factors: list
    errors: list = field(default_factory=list)
    n_iter: int = 0
    rel_error: float = float("nan")
    tensor_norm: float = float("nan")
    norm_history: list = field(default_factory=list)

    @property
    def component_norms(self) -> torch.Tensor:
        """``[R]``: the Frobenius norm of each rank-1 term (the factors have unit columns)."""
        return self.weights.abs()

    @property
    def norm_ratio(self) -> float:
        """``sum_r weights_r^2 / ||X||^2``: about 1 or below for a healthy decomposition, far above 1
        when components cancel each other. The quantity EPC minimises."""
        return float(self.weights.double().square().sum()) / self.tensor_norm ** 2

    @property
    def sensitivity(self) -> float:
        """Sensitivity of Phan et al. (ECCV 2020): ``E||X^(factors + E) - X^||^2 / sigma^2`` for i.i.d.
        Gaussian perturbations E of variance sigma^2 of the factors, with each component's norm spread
        equally over its N factors (as :class:`~tdconv.FactorizedConv2d` stores them), to first order:
        ``sum_n I_n sum_r |weights_r|^(2(N-1)/N)``; divided by ``||X||^(2(N-1)/N)`` so that it does
        not depend on the tensor's scale."""
        n = len(self.factors)
        p = 2.0 * (n - 1) / n
        total = sum(int(f.shape[0]) for f in self.factors) * float(self.weights.double().abs().pow(p).sum())
        return total / self.tensor_norm ** p

    def diagnostics(self) -> dict:
        """``{"sensitivity", "norm_ratio", "max_component_norm", "min_component_norm"}``, the norms
        relative to ``||X||``."""
        norms = self.component_norms.double() / self.tensor_norm
        return {"sensitivity": self.sensitivity, "norm_ratio": self.norm_ratio,
                "max_component_norm": float(norms.max()), "min_component_norm": float(norms.min())}

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])

    @property
    def shape(self) -> tuple:
        return tuple(int(f.shape[0]) for f in self.factors)

    def to_tensor(self) -> torch.Tensor:
        """The full tensor ``[I_0, ..., I_{N-1}]``."""
        return _ref.cp_to_tensor(self.weights, self.factors)

    def __iter__(self):  # ``weights, factors = cp`` as with tensorly's CPTensor
        return iter((self.weights, self.factors))

    def __getitem__(self, index):  # ``cp[0]`` / ``cp[1]``: weights / factors, as with tensorly's CPTensor
        return (self.weights, self.factors)[index]

    def __len__(self) -> int:
        return 2

    def __repr__(self) -> str:
        return (f"CPTensor(shape={self.shape}, rank={self.rank}, rel_error={self.rel_error:.4g}, "
                f"n_iter={self.n_iter}, dtype={self.weights.dtype}, device={self.weights.device})")


@dataclass
class TuckerTensor:
    """A Tucker decomposition ``core x_{modes[0]} factors[0] x_{modes[1]} factors[1] ...``.

    Attributes
    ----------
    core : Tensor
        The core: the input's shape with every decomposed mode reduced to its rank.
    factors : list of Tensor [I_mode, rank]
        One factor with orthonormal columns per decomposed mode.
    modes : tuple of int
        The decomposed modes (``(0, 1)`` is Tucker-2 on the channel modes of a conv kernel).
    errors : list of float
        Relative error after every HOOI sweep (empty for HOSVD).
    n_iter : int
        Number of HOOI sweeps run (0 for HOSVD).
    rel_error : float
        Final relative error, computed from the rebuilt tensor.
    """

    core: torch.Tensor
    factors: list
    modes: tuple
    errors: list = field(default_factory=list)
    n_iter: int = 0
    rel_error: float = float("nan")

    @property
    def ranks(self) -> tuple:
        return tuple(int(f.shape[1]) for f in self.factors)

    @property
    def shape(self) -> tuple:
        shape = list(self.core.shape)
        for f, m in zip(self.factors, self.modes):
            shape[m] = int(f.shape[0])
        return tuple(shape)

    def to_tensor(self) -> torch.Tensor:
        """The full tensor."""
        return _ref.tucker_to_tensor(self.core, self.factors, list(self.modes))

    def __iter__(self):  # ``core, factors = tucker`` as with tensorly's TuckerTensor
        return iter((self.core, self.factors))

    def __getitem__(self, index):  # ``tucker[0]`` / ``tucker[1]``: core / factors
        return (self.core, self.factors)[index]

    def __len__(self) -> int:
        return 2

    def __repr__(self) -> str:
        return (f"TuckerTensor(shape={self.shape}, modes={self.modes}, ranks={self.ranks}, "
                f"rel_error={self.rel_error:.4g}, n_iter={self.n_iter}, dtype={self.core.dtype}, "
                f"device={self.core.device})")
