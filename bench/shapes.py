"""Workload shapes and measuring helpers shared by the benchmarks and the GPU tests."""

from __future__ import annotations

import torch


def llama8b_shapes() -> list[tuple[int, int]]:
    """LLaMA3-8B's weight matrices: 32 blocks of q, k, v, o, gate, up, down; embedding and head (226 tensors)."""
    h, kv, inter, vocab = 4096, 1024, 14336, 128256
    block = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    return [(vocab, h)] + block * 32 + [(vocab, h)]


def llama8b_inputs(device, gen) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random fp32 gradients and bf16 weights of LLaMA3-8B's shapes (48 GB on the GPU)."""
    shapes = llama8b_shapes()
    grads = [torch.randn(s, device=device, generator=gen) for s in shapes]
    weights = [(torch.randn(s, device=device, generator=gen) * 0.02).to(torch.bfloat16) for s in shapes]
    return grads, weights


def peak_extra_memory(fn):
    """(result of fn(), peak CUDA memory allocated during it beyond what was allocated before, in bytes)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before
