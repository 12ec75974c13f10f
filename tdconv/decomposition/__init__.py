"""CP and Tucker decompositions of weight tensors, computed on the tensor's own device.

The algorithms run inside the compiled extension (``torch.ops.tdconv.*``); when it is missing or
cannot run on the tensor's device, the plain-PyTorch reference (:mod:`tdconv.reference`) takes over
with a :class:`tdconv.FallbackWarning` (one seam, :func:`tdconv._ext.use_extension`, decides for every
op). float32 and float64 tensors are decomposed in their own precision; float16 and bfloat16 tensors
in float32 (the results are float32).

Layout (as tensorly's): containers (:class:`CPTensor`, :class:`TuckerTensor`), CP (:func:`initialize_cp`,
:func:`cp_als`, :func:`cp_epc`), Tucker (:func:`tucker_hosvd`, :func:`tucker_hooi`), batches
(:func:`decompose_batch`) and conv kernels (:func:`decompose_kernel`).
"""
from ._containers import CPTensor, TuckerTensor
from .batch import decompose_batch
from .cp import cp_als, cp_epc, initialize_cp
from .kernels import KERNEL_METHODS, decompose_kernel, truncated_svd
from .tucker import tucker_hooi, tucker_hosvd

__all__ = ["CPTensor", "TuckerTensor", "initialize_cp", "cp_als", "cp_epc", "tucker_hosvd", "tucker_hooi",
           "decompose_batch", "decompose_kernel", "truncated_svd", "KERNEL_METHODS"]
