"""Deprecated: the decompositions moved to :mod:`tdconv.decomposition` (the same names, also on ``tdconv``)."""
import warnings

from .decomposition import (CPTensor, TuckerTensor, cp_als, cp_epc, decompose_batch, initialize_cp,
                            tucker_hooi, tucker_hosvd)

__all__ = ["CPTensor", "TuckerTensor", "cp_als", "cp_epc", "decompose_batch", "initialize_cp", "tucker_hooi",
           "tucker_hosvd"]

warnings.warn("tdconv.decompose is deprecated: import from tdconv (or tdconv.decomposition) instead",
              DeprecationWarning, stacklevel=2)
