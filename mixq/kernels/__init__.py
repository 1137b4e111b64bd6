"""mixq.kernels: the Triton kernels of the ``triton`` backend (NVIDIA GPUs, Hopper first).

On machines without a GPU the same kernels run on CPU tensors under ``TRITON_INTERPRET=1``
(set before this package is imported), which is how the tests check them bit-exactly.
"""

from .gemm import mixed_gemm, quantized_linear_dynamic
from .layout import K_TILE, SUB_K, prepack_gpu, unprepack_gpu
from .quantize import layernorm_quantize, quantize_dynamic, quantize_static
from .tuning import GemmConfig, heuristic_config, pick_config

__all__ = [
    "GemmConfig",
    "K_TILE",
    "SUB_K",
    "heuristic_config",
    "layernorm_quantize",
    "mixed_gemm",
    "pick_config",
    "prepack_gpu",
    "quantize_dynamic",
    "quantize_static",
    "quantized_linear_dynamic",
    "unprepack_gpu",
]
