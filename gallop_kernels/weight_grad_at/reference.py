"""Pure-PyTorch weight gradient of a linear layer at selected entries, by either path:

* ``dense``: the dense product ``G^T X`` in the inputs' dtype (as torch's linear backward computes it), then a
  gather. ``M * N * T`` multiply-adds on a GEMM.
* ``sampled``: only the selected entries, ``out[i] = sum_t G[t, r_i] * X[t, c_i]``, as a sampled dense-dense
  product (SDDMM: ``torch.sparse.sampled_addmm`` over a CSR pattern of the selected entries) accumulated in fp32 and
  rounded once to the inputs' dtype, as the dense path's entries are. ``K * T``
  multiply-adds, each entry one dot product of a row of ``G^T`` and a column of ``X``. On a CPU it beats the GEMM
  up to about 10% of a tensor at 64 tokens and 25% at 1024 (docs/performance.md holds the crossover table).

This is also what runs on CUDA today (no Triton kernel has been measured against cuBLAS yet). Inputs are assumed
validated (``gallop_kernels.api``): indices in range, any order, duplicates allowed.
"""

from __future__ import annotations

import warnings

import torch


def weight_grad_at(
    grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor, path: str = "dense"
) -> torch.Tensor:
    """fp32 ``(grad_output_2d^T @ input_2d).view(-1)[indices]`` by the ``dense`` or the ``sampled`` path."""
    g = grad_output.reshape(-1, grad_output.shape[-1])
    x = input.reshape(-1, input.shape[-1])
    if path == "sampled":
        # Rounded once to the inputs' dtype, as the dense path's GEMM output is: both paths then answer alike,
        # including an fp16 entry beyond 65504, which is inf on both (as in torch's own linear backward).
        return _sampled(g, x, indices).to(g.dtype).to(torch.float32)
    dense = g.t().matmul(x)
    return dense.reshape(-1).index_select(0, indices).to(torch.float32)


def _strictly_increasing(idx: torch.Tensor) -> bool:
    return idx.numel() < 2 or not bool((idx[1:] <= idx[:-1]).any())


def _sampled(g: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """SDDMM of ``G^T [M, T]`` and ``X [T, N]`` on the CSR pattern of ``indices``, in fp32.

    A CSR pattern needs sorted, unique column indices per row, which sorted unique flat indices give directly
    (a SparseModel's always are); other index orders go through ``torch.unique`` and back.
    """
    m, n = g.shape[-1], x.shape[-1]
    idx = indices.to(torch.int64)
    inverse = None
    if not _strictly_increasing(idx):
        idx, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    k = idx.numel()
    if k == 0 or g.shape[0] == 0:
        out = torch.zeros(k, dtype=torch.float32, device=g.device)
        return out if inverse is None else out[inverse]
    rows = torch.div(idx, n, rounding_mode="floor")
    crow = torch.zeros(m + 1, dtype=torch.int64, device=g.device)
    torch.cumsum(torch.bincount(rows, minlength=m), 0, out=crow[1:])
    # Each entry is a dot product over the tokens of a row of mat1 and a column of mat2: hand them over
    # token-contiguous (G^T row-major, X column-major; strided reads cost more than these two copies) and in fp32
    # (sampled_addmm has no bf16/fp16 kernel, and fp32 accumulation is this path's contract).
    mat1 = g.t().to(torch.float32).contiguous()
    mat2 = x.t().to(torch.float32).contiguous().t()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            crow, idx - rows * n, torch.zeros(k, dtype=torch.float32, device=g.device), (m, n), check_invariants=False
        )
        out = torch.sparse.sampled_addmm(pattern, mat1, mat2, beta=0.0).values()
    return out if inverse is None else out[inverse]
