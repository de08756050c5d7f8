"""Pure-PyTorch weight gradient of a linear layer at selected entries, by either path:

* ``dense``: the dense product ``G^T X`` in the inputs' dtype (as torch's linear backward computes it), then a
  gather. ``M * N * T`` multiply-adds on a GEMM: best when many entries are selected.
* ``sampled``: only the selected entries, ``out[i] = sum_t G[t, r_i] * X[t, c_i]``, a gather-dot over the tokens in
  chunks of entries. ``K * T`` multiply-adds but gathers: best when few are (below about 0.4% of a tensor on a CPU;
  docs/performance.md has the crossover table).

This is also what runs on CUDA today (no Triton kernel has been measured against cuBLAS yet). Inputs are assumed
validated (``gallop_kernels.api``).
"""

from __future__ import annotations

import torch

SAMPLED_CHUNK = 4096  # entries per gather-dot chunk: bounds the [T, chunk] temporaries


def weight_grad_at(
    grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor, path: str = "dense"
) -> torch.Tensor:
    """fp32 ``(grad_output_2d^T @ input_2d).view(-1)[indices]`` by the ``dense`` or the ``sampled`` path."""
    g = grad_output.reshape(-1, grad_output.shape[-1])
    x = input.reshape(-1, input.shape[-1])
    if path == "sampled":
        return _sampled(g, x, indices)
    dense = g.t().matmul(x)
    return dense.reshape(-1).index_select(0, indices).to(torch.float32)


def _sampled(g: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    idx = indices.to(torch.int64)
    rows, cols = idx // n, idx % n
    out = torch.empty(idx.numel(), dtype=torch.float32, device=g.device)
    for s in range(0, idx.numel(), SAMPLED_CHUNK):
        r, c = rows[s : s + SAMPLED_CHUNK], cols[s : s + SAMPLED_CHUNK]
        prod = g.index_select(1, r).float()  # [T, chunk], a fresh tensor: multiplied in place
        prod.mul_(x.index_select(1, c))
        torch.sum(prod, 0, out=out[s : s + SAMPLED_CHUNK])
    return out
