"""gallop_kernels: the kernels behind GaLLoP sparse fine-tuning, as a stable functional API.

Knows tensors, not models. One folder per op or family of ops, named after them (``sparse_adamw``,
``gather_scatter``, ``weight_grad_at``; ``select_topk``), each with its pure-PyTorch
``reference.py`` and, where one exists, its ``triton.py``; ``api.py`` is the contract; README.md says how to add
an op. Triton kernels run on CUDA tensors, the exact reference elsewhere (``GALLOP_BACKEND=auto|reference|triton``).
``check_real`` / ``check_int`` are the one set of scalar validators (the ops' and gallop's): TypeError for a value
of the wrong type, ValueError for a wrong value.
"""

from ._common import SCORERS, index_dtype
from ._registry import InterpreterRequiredError, backend
from ._validate import integer as check_int
from ._validate import real as check_real
from .api import (
    gather,
    scatter_,
    scatter_grouped_,
    select_topk,
    sparse_adamw_,
    sparse_adamw_step_,
    weight_grad_at,
)

__version__ = "0.2.0"  # the one version of the gallop distribution (pyproject.toml and gallop read it)
__all__ = [
    "select_topk",
    "sparse_adamw_",
    "sparse_adamw_step_",
    "gather",
    "scatter_",
    "scatter_grouped_",
    "weight_grad_at",
    "backend",
    "InterpreterRequiredError",
    "SCORERS",
    "index_dtype",
    "check_real",
    "check_int",
    "__version__",
]
