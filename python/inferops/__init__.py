"""inferops: hand-written CUDA kernels for LLM inference with a small PyTorch API.

Families (see docs/): attention (paged prefix-shared attention, BatchLLM),
linear_attention (SLAB), quant (OstQuant), moe (ExFlow), gemm + reduce-scatter (T3).

``import inferops`` never needs a GPU: the compiled extension loads lazily and
every op falls back to its PyTorch reference for CPU tensors or when the CUDA
kernels are not available (:func:`cuda_available` says why).
"""

from ._core.extension import build_info, cuda_available, cuda_unavailable_reason
from . import attention, linear_attention, moe, quant, reference, tp  # noqa: E402  (registers the ops)

__version__ = "0.1.0"

__all__ = [
    "attention",
    "linear_attention",
    "moe",
    "quant",
    "reference",
    "tp",
    "build_info",
    "cuda_available",
    "cuda_unavailable_reason",
    "__version__",
]
