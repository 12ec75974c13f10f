"""tdconv: tensor-decomposed convolutions that are actually faster.

The decomposition engine (CP-ALS, EPC, HOSVD, HOOI) runs in the compiled extension ``tdconv._C`` on the
tensor's own device; ``import tdconv`` works without it (see ``python -m tdconv.info``).
"""
from ._ext import FallbackWarning, has_cuda_ext, has_ext, unavailable_reasons
from . import counting
from .compress import compress
from .counting import ptflops_aten_hooks, ptflops_hooks
from .inference import InferenceReport, optimize_for_inference, to_standard
from .decomposition import (CPTensor, TuckerTensor, cp_als, cp_epc, decompose_batch, initialize_cp, tucker_hooi,
                            tucker_hosvd)
from .nn import FactorizedConv2d, FactorizedLinear, LiveTapConv2d, autotuning, set_autotune, skip_padding_taps
from .report import CompressionReport
from .serialization import load, save
from .version import __version__

__all__ = [
    "CPTensor", "TuckerTensor", "initialize_cp", "cp_als", "cp_epc", "tucker_hosvd", "tucker_hooi", "decompose_batch",
    "FactorizedConv2d", "FactorizedLinear", "LiveTapConv2d", "skip_padding_taps", "set_autotune", "autotuning", "compress",
    "CompressionReport", "save", "load", "optimize_for_inference", "to_standard", "InferenceReport",
    "ptflops_hooks", "ptflops_aten_hooks", "has_ext", "has_cuda_ext", "unavailable_reasons", "FallbackWarning",
    "__version__",
]
