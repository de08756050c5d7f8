"""gallop_kernels: the kernels behind GaLLoP sparse fine-tuning, as a stable functional API.

Knows tensors, not models. Triton kernels on CUDA tensors, an exact pure-PyTorch reference elsewhere
(``GALLOP_BACKEND=auto|reference|triton`` overrides the choice).
"""

from ._backend import backend
from .api import gather, scatter_, select_topk, sparse_adamw_, sparse_adamw_step_, weight_grad_at

__all__ = ["select_topk", "sparse_adamw_", "sparse_adamw_step_", "gather", "scatter_", "weight_grad_at", "backend"]
__version__ = "0.1.0"
