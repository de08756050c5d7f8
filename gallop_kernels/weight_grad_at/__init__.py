"""weight_grad_at: a linear layer's weight gradient at selected entries only, ``(G^T X).view(-1)[indices]``.

``reference.py`` holds both paths: ``dense`` (the GEMM ``G^T X`` in the inputs' dtype, then a gather) and
``sampled`` (only the selected entries, a sampled dense-dense product: ``torch.sparse.sampled_addmm`` on the CSR
pattern of the indices, fp32 accumulation, rounded once to the inputs' dtype). ``choose_path`` picks one per call:
``path="auto"`` takes ``sampled`` at or below ``SAMPLED_MAX_DENSITY`` of the tensor's entries for its device type
(10% on a CPU; 0 on CUDA, so CUDA runs ``dense`` unless asked for ``sampled``). There is no Triton kernel: the
reference is what every device runs. This module checks the arguments, chooses the path and registers the
``torch.library`` custom op ``gallop::weight_grad_at``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._registry import implementation
from .._validate import check_float, check_index_range, check_indices, check_same_device


def check_weight_grad_at_args(grad_output, input, indices, check_range: bool = True, path: str = "auto") -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    check_float(grad_output, "grad_output")
    check_float(input, "input")
    if grad_output.dtype != input.dtype:
        raise TypeError(
            f"grad_output is {grad_output.dtype} but input is {input.dtype}; cast both to one dtype "
            f"(the autocast dtype under autocast)"
        )
    if grad_output.dim() < 1 or input.dim() < 1 or grad_output.shape[:-1] != input.shape[:-1]:
        raise ValueError(
            f"grad_output {tuple(grad_output.shape)} and input {tuple(input.shape)} must share their "
            f"leading (token) dimensions: [..., M] and [..., N]"
        )
    check_indices(indices)
    check_same_device([("grad_output", grad_output), ("input", input), ("indices", indices)])
    if check_range:
        check_index_range(indices, grad_output.shape[-1] * input.shape[-1])


PATHS = ("auto", "dense", "sampled")
#: the sampled path is used at or below this fraction of a tensor's entries (``path="auto"``), per device type:
#: the measured crossover on a 2-core x86 CPU is 10% of a tensor at 64 tokens and 25% at 1024 (docs/performance.md);
#: CUDA keeps the dense cuBLAS path until measured
SAMPLED_MAX_DENSITY = {"cpu": 0.1, "cuda": 0.0}


def choose_path(path: str, k: int, m: int, n: int, device: torch.device) -> str:
    """``dense`` or ``sampled`` for ``k`` entries of an ``[m, n]`` gradient (``path="auto"`` picks by density)."""
    if path != "auto":
        return path
    return "sampled" if k <= SAMPLED_MAX_DENSITY.get(device.type, 0.0) * m * n else "dense"


def weight_grad_at(grad_output: Tensor, input: Tensor, indices: Tensor, path: str) -> Tensor:
    return implementation("weight_grad_at", grad_output.device)(grad_output, input, indices, path)


weight_grad_at_op = torch.library.custom_op("gallop::weight_grad_at", weight_grad_at, mutates_args=())


@weight_grad_at_op.register_fake
def _(grad_output, input, indices, path):
    return torch.empty(indices.shape, dtype=torch.float32, device=grad_output.device)
