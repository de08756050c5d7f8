"""Triton: gather from a dense tensor at flat indices (to fp32), and scatter ``cast(base + delta)`` into it.

``gather``:   ``out[i] (+)= fp32(src[idx[i]])``                 src: any float dtype, out: fp32
``scatter_``: ``dst[idx[i]] = cast(fp32(base[i]) + values[i])``   one rounding to dst's dtype (RNE)

One program handles ``BLOCK`` consecutive indices (sorted indices make the dense accesses nearly coalesced);
offsets are int64. An index outside the dense tensor is masked out (read as 0, never written): the public API
rejects such indices before launching, and the kernels stay memory-safe even when that check is skipped. Every
tensor is read as flat contiguous memory (the public API copies or refuses any other layout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._tl import cast_rne

BLOCK = 1024


@triton.jit
def _gather_kernel(src_ptr, idx_ptr, out_ptr, n, n_src, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    inside = mask & (idx >= 0) & (idx < n_src)  # never read outside src, whatever the indices
    vals = tl.load(src_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    if ACCUMULATE:
        vals += tl.load(out_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, vals, mask=mask)


@triton.jit
def _scatter_kernel(dst_ptr, idx_ptr, val_ptr, base_ptr, n, n_dst, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    vals = tl.load(val_ptr + offs, mask=mask)
    if HAS_BASE:
        vals += tl.load(base_ptr + offs, mask=mask).to(tl.float32)
    inside = mask & (idx >= 0) & (idx < n_dst)  # never write outside dst, whatever the indices
    tl.store(dst_ptr + idx, cast_rne(vals, dst_ptr.dtype.element_ty), mask=inside)


def gather(src, indices, *, out=None, accumulate=False):
    """Triton twin of ``reference.gather`` (inputs validated by ``gallop_kernels.gather``)."""
    n = indices.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=src.device)
    if n:
        _gather_kernel[(triton.cdiv(n, BLOCK),)](src, indices, out, n, src.numel(), ACCUMULATE=accumulate, BLOCK=BLOCK)
    return out


def scatter_(dst, indices, values, *, base=None) -> None:
    """Triton twin of ``reference.scatter_`` (inputs validated by ``gallop_kernels.scatter_``)."""
    n = indices.numel()
    if n:
        _scatter_kernel[(triton.cdiv(n, BLOCK),)](
            dst,
            indices,
            values,
            values if base is None else base,
            n,
            dst.numel(),
            HAS_BASE=base is not None,
            BLOCK=BLOCK,
        )
