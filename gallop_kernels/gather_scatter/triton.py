"""Triton: gather from a dense tensor at flat indices (to fp32), and scatter ``cast(base + delta)`` into it.

``gather``:           ``out[i] (+)= fp32(src[idx[i]])``                 src: any float dtype, out: fp32
``scatter_``:         ``dst[idx[i]] = cast(fp32(base[i]) + values[i])``   one rounding to dst's dtype (RNE)
``scatter_grouped_``: ``scatter_`` for every entry of a group, in one launch per (dst, indices, base) dtype triple

One program handles ``BLOCK`` consecutive indices (sorted indices make the dense accesses nearly coalesced);
offsets are int64. An index outside the dense tensor is masked out (read as 0, never written): the public API
rejects such indices before launching, and the kernels stay memory-safe even when that check is skipped. Every
tensor is read as flat contiguous memory (the public API copies or refuses any other layout).

The grouped kernel reads its tensors' addresses and sizes from a table (one int64 row per entry, ``COLUMNS``
wide; the rows of one launch share their dtypes) and the row of each program from ``block_row`` (one int32 per
block, ``repeat_interleave`` of the rows by their block counts on the device, without a sync), as
``select_topk``'s ``_compact_mask_kernel`` does. The dtypes of an entry's pointers come from the launch's first
entry (``dst_like``, ``idx_like``, ``base_like``: passed for their types only), so an entry is written exactly as
``_scatter_kernel`` writes it.
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


COLUMNS = 8  # the grouped table's columns: dst, indices, values, base addresses; n, n_dst, first block, blocks
_COLUMNS = tl.constexpr(COLUMNS)


@triton.jit
def _scatter_grouped_kernel(
    table_ptr, block_row_ptr, dst_like, idx_like, base_like, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr
):
    """``_scatter_kernel`` for the block ``pid - first`` of the entry in row ``block_row[pid]`` of the table."""
    pid = tl.program_id(0).to(tl.int64)
    row = table_ptr + tl.load(block_row_ptr + pid).to(tl.int64) * _COLUMNS
    dst_ptr = tl.load(row).to(tl.pointer_type(dst_like.dtype.element_ty))
    idx_ptr = tl.load(row + 1).to(tl.pointer_type(idx_like.dtype.element_ty))
    val_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    n, n_dst, first = tl.load(row + 4), tl.load(row + 5), tl.load(row + 6)
    offs = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    vals = tl.load(val_ptr + offs, mask=mask)
    if HAS_BASE:
        base_ptr = tl.load(row + 3).to(tl.pointer_type(base_like.dtype.element_ty))
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


def scatter_grouped_(dsts, indices, values, *, bases=None) -> None:
    """Triton twin of ``reference.scatter_grouped_`` (inputs validated by ``gallop_kernels.scatter_grouped_``):
    one table copy to the device, one ``repeat_interleave``, and one launch per distinct (dst, indices, base) dtype
    triple (one in a model of one dtype); entries without indices are left out."""
    groups: dict[tuple, list[int]] = {}
    for i, idx in enumerate(indices):
        if idx.numel():
            key = (dsts[i].dtype, idx.dtype, None if bases is None else bases[i].dtype)
            groups.setdefault(key, []).append(i)
    if not groups:
        return
    rows, launches, total = [], [], 0
    for members in groups.values():
        first = 0
        for i in members:
            n = indices[i].numel()
            blocks = -(-n // BLOCK)  # ceil; triton.cdiv is a JIT function, slow on the host
            base = 0 if bases is None else bases[i].data_ptr()
            rows.append([dsts[i].data_ptr(), indices[i].data_ptr(), values[i].data_ptr(), base, n, dsts[i].numel(),
                         first, blocks])  # fmt: skip
            first += blocks
        launches.append((total, first, members[0]))
        total += first
    device = dsts[launches[0][2]].device
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    rows_id = torch.arange(len(rows), dtype=torch.int32, device=device)
    block_row = torch.repeat_interleave(rows_id, table[:, COLUMNS - 1], output_size=total)
    for start, blocks, i in launches:
        _scatter_grouped_kernel[(blocks,)](
            table,
            block_row[start:],
            dsts[i],
            indices[i],
            values[i] if bases is None else bases[i],
            HAS_BASE=bases is not None,
            BLOCK=BLOCK,
        )
