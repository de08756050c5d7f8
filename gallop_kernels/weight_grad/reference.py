"""Pure-PyTorch weight gradient of a linear layer at selected entries: the dense product, then a gather.

This is also what runs on CUDA today (cuBLAS GEMM + gather): no sampled Triton kernel has been shown to beat it.
Inputs are assumed validated (``gallop_kernels.api``)."""

from __future__ import annotations

import torch


def weight_grad_at(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """fp32 ``(grad_output_2d^T @ input_2d).view(-1)[indices]``.

    The product runs in the inputs' dtype (as torch's own linear backward does), so on bf16 activations it rounds
    like the stock weight gradient before the gather.
    """
    g = grad_output.reshape(-1, grad_output.shape[-1])
    x = input.reshape(-1, input.shape[-1])
    dense = g.t().matmul(x)
    return dense.reshape(-1).index_select(0, indices).to(torch.float32)
