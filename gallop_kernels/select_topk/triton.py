"""Triton: exact global top-k over many tensors by radix select on 32-bit score keys, fused with scoring.

Keys are the same as the reference's (``gallop_kernels._common``): a larger key is selected first; finite scores
map to [0, 0x7F7FFFFF]; NaN/Inf land in histogram bins 0x7F8..0x7FF of the first level, which no finite key reaches.
Scores are computed in registers from (grad, weight) in every pass and never stored.

Passes ("block" = ``BLOCK`` consecutive elements, numbered globally across tensors; the passes that read (grad,
weight) take one launch per tensor), the host steps named like the reference's:

1. ``_level1_histogram`` (``_histogram_kernel``): persistent programs build a 2048-bin histogram of key bits
   30..20 (``tl.histogram``) into the tensor's row of a [T, 2048] histogram, once per program. A large call
   (``SAMPLE_MIN_BLOCKS`` blocks or more) reads every ``SAMPLE_STRIDE``-th block only. Host (``_pick_bin``, one
   sync): the bin ``b1`` holding the k-th key (of the sample: the ``k * read / total``-th), its count, the
   NaN/Inf check.
2. ``_Collected`` (``_collect_kernel``): per block, a bit mask of the keys above ``b1`` (``BLOCK // 32`` int32
   words), their count, the count of NaN/Inf keys, and the keys in ``b1`` (the candidates) with their global
   positions appended to a buffer (one atomic per block; order irrelevant). One sync: the counts. A sampled bin is
   used only if the exact counts confirm it (``above < k <= above + candidates``, every candidate buffered), else
   the exact path (step 1 over every block) runs; the result is the same either way.
3. ``_chosen_candidates`` (torch, on the candidates only): one sort on (key, -position); the best ``k - above``
   are selected (ties to the lower (tensor, index), the reference's rule).
4. ``_compact_mask``: ``_set_bits_kernel`` adds them to the mask, ``_popcount_kernel`` counts it per block (one
   sync: the per-tensor counts, which must sum to k), and ``_compact_mask_kernel`` writes every tensor's indices
   in order, from the mask alone, straight into the outputs (one launch over all tensors, a pointer table). The
   result is exactly k indices, sorted per tensor, identical to the reference.

So a call reads every (grad, weight) pair twice (a large call 2 + 1/32 times) and syncs three times. Heavy ties
(more than ``CANDIDATE_CAP`` keys in ``b1``) take ``_resolve_by_passes``: two more histogram passes (bits 19..9,
then 8..0) give the threshold ``T``, ``_count_kernel`` counts > T / == T per block, and ``_compact`` (
``_compact_kernel``) writes the keys > T and the ties whose global rank is below the quota, reading (g, w) again.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._common import MAX_KEY, SCORER_IDS, index_dtype, nonfinite_score_error, random_seed_key, threshold_bin

BLOCK = 2048  # elements per block (tests lower it to exercise many blocks on small tensors)
CANDIDATE_CAP = 1 << 25  # candidate keys buffered in pass 2 (12 bytes each: int32 key + int64 block number)
SAMPLE_STRIDE = 32  # a large call's level-1 histogram reads every 32nd block of each tensor
SAMPLE_MIN_BLOCKS = 8192  # ... when the call has at least this many blocks (16M elements); else all of them
DENSE_SPACING = 64  # collect scans (DENSE) when the host expects a candidate per 64 elements (2 words) or more
GROUP = 16  # blocks per program of the mask kernels (popcount, compaction)
SET_BLOCK = 1024  # chosen candidates per program of _set_bits_kernel
NB1, SHIFT1 = 2048, 20  # level 1: key bits 30..20 (plus the invalid bins 0x7F8..0x7FF)
NB2, SHIFT2 = 2048, 9  # level 2: key bits 19..9
NB3 = 512  # level 3: key bits 8..0
INVALID_BIN = MAX_KEY >> SHIFT1  # 0x7F7: bins above it only hold NaN/Inf scores
_INVALID_BIN = tl.constexpr(INVALID_BIN)  # the same, readable inside a compiled kernel
_SHIFT1 = tl.constexpr(SHIFT1)
_EDGE = tl.constexpr(8)  # key distance from a bin edge inside which a fast-division key is recomputed exactly


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _keys(g_ptr, w_ptr, offs, mask, eps, tkey, first, SCORER: tl.constexpr, APPROX: tl.constexpr):
    """Int32 keys of the elements at ``g_ptr/w_ptr + offs``, whose flat indices are ``first + offs`` (the random
    scorer hashes them); masked lanes get garbage, never used. ``APPROX``: the gallop quotient by the fast
    division (``div.full.f32``, within 2 ulp), for callers that check the bin edges (``_near_edges``)."""
    if SCORER == 4:  # random: mix32(mix32(tkey ^ index_hi) ^ index_lo) >> 2
        index = first + offs
        lo = (index & 0xFFFFFFFF).to(tl.uint32)
        hi = (index >> 32).to(tl.uint32)
        h = _mix32(hi ^ tl.cast(tkey, tl.uint32))
        h = _mix32(h ^ lo)
        return (h >> 2).to(tl.int32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SCORER == 2:  # magnitude: 0x7F7FFFFF - bits(|w|)
        return 0x7F7FFFFF - tl.abs(w).to(tl.int32, bitcast=True)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SCORER == 0:  # gallop: |g| / (|w| + eps), IEEE division like torch (or the fast one)
        if APPROX:
            s = tl.fdiv(tl.abs(g), tl.abs(w) + eps, ieee_rounding=False)
        else:
            s = tl.div_rn(tl.abs(g), tl.abs(w) + eps)
    elif SCORER == 1:  # gradient: |g|
        s = tl.abs(g)
    else:  # product: |g * w|
        s = tl.abs(g * w)
    return s.to(tl.int32, bitcast=True)


@triton.jit
def _near_edges(keys, level, SHIFT: tl.constexpr):
    """Where a fast-division key may fall in another bin than the exact key: within ``EDGE`` of the edges of bin
    ``level`` (``div.full.f32`` is within 2 ulp of the quotient, the IEEE one within 0.5: 3 ulp, 6 across a
    binade), a quotient in or near the subnormal range (which the fast division may flush to 0), near the top of
    the range, or not finite."""
    low = keys - (level << SHIFT)
    high = low - (1 << SHIFT)
    edge = ((low > -_EDGE) & (low < _EDGE)) | ((high > -_EDGE) & (high < _EDGE))
    return edge | ((keys > 0) & (keys < 0x01800000)) | (keys >= 0x7E800000) | (keys < 0)


@triton.jit
def _block_keys(g_ptr, w_ptr, n, eps, tkey, SCORER: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block: (block number, int64 flat offsets, in-range mask, keys)."""
    b = tl.program_id(0)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    return b, offs, mask, _keys(g_ptr, w_ptr, offs, mask, eps, tkey, 0, SCORER, False)


@triton.jit
def _histogram_kernel(
    g_ptr,
    w_ptr,
    hist_ptr,
    n,
    eps,
    tkey,
    prefix,
    n_blocks,
    block_stride,
    PREFIX_SHIFT: tl.constexpr,
    BIN_SHIFT: tl.constexpr,
    NBINS: tl.constexpr,
    EVEN: tl.constexpr,
    APPROX: tl.constexpr,
    SCORER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """hist[bin] += #{keys with (key >> PREFIX_SHIFT) == prefix} by bin (key >> BIN_SHIFT) & (NBINS - 1).

    PREFIX_SHIFT == 32 means no prefix filter (level 1, where negative keys must land in the invalid bins).
    Persistent: program p handles blocks p, p + grid, ... of the ``n_blocks`` blocks read, which are every
    ``block_stride``-th block of the tensor (1: all of them); one histogram add per program. ``EVEN``: ``n`` is
    a multiple of ``BLOCK`` (no bounds masks); ``APPROX``: fast-division keys (a sampled level 1, which only
    guides the exact collect pass).
    """
    pid = tl.program_id(0)
    acc = tl.zeros((NBINS,), dtype=tl.int32)
    excluded = 0
    for b in range(pid, n_blocks, tl.num_programs(0)):
        first = tl.cast(b, tl.int64) * block_stride * BLOCK
        offs = tl.arange(0, BLOCK)
        if EVEN:
            mask = tl.full((BLOCK,), 1, tl.int1)
        else:
            mask = offs < tl.minimum(n - first, BLOCK).to(tl.int32)
        keys = _keys(g_ptr + first, w_ptr + first, offs, mask, eps, tkey, first, SCORER, APPROX)
        if PREFIX_SHIFT < 32:
            mask = mask & ((keys >> PREFIX_SHIFT) == prefix)
        bins = tl.where(mask, (keys >> BIN_SHIFT) & (NBINS - 1), 0)
        acc += tl.histogram(bins, NBINS)  # excluded lanes were counted in bin 0: subtracted below
        excluded += BLOCK - tl.sum(mask.to(tl.int32), 0)
    acc -= tl.where(tl.arange(0, NBINS) == 0, excluded, 0)
    tl.atomic_add(hist_ptr + tl.arange(0, NBINS), acc.to(tl.int64), sem="relaxed")  # order-free sums


@triton.jit
def _popcount(x):
    """Set bits of each uint32 (SWAR; no intrinsic, so the interpreter runs it too), as int32."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _lowest_bit(x):
    """(the lowest set bit of each uint32 as a mask, its position 0..31); garbage position where x == 0."""
    low = x & (0 - x)  # two's complement negation: x & -x
    return low, (low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127  # a power of two converts exactly


@triton.jit
def _collect_kernel(
    g_ptr,
    w_ptr,
    n,
    eps,
    tkey,
    level,
    first_block,
    mask_ptr,
    above_ptr,
    invalid_ptr,
    cand_key_ptr,
    cand_pos_ptr,
    cand_count_ptr,
    capacity,
    SHIFT: tl.constexpr,
    DENSE: tl.constexpr,
    EVEN: tl.constexpr,
    SCORER: tl.constexpr,
    BLOCK: tl.constexpr,
    EDGE_CHECK: tl.constexpr = True,
):
    """Per block (``BLOCK // 32`` words of 32 keys): mask bit = ``key >> SHIFT > level`` (the keys surely
    selected), above[block] = their count, invalid[block] = #{NaN/Inf keys}; the keys with ``key >> SHIFT ==
    level`` (the candidates) are appended with their global positions (``block * BLOCK + i``) to a buffer, one
    atomic per block (order irrelevant).

    Candidates are found a word at a time (lowest set bit first), so a block costs a loop of as many steps as its
    fullest word has candidates, not a scan over its keys; their exact keys are recomputed from (grad, weight) at
    those positions (still in cache). When candidates are dense (``DENSE``: the host expects one or more every
    two words, heavy ties) a block ranks them by a scan over its keys instead. The count is bumped by every
    block's full tally, but stores stay inside ``capacity``: a count above it means the passes disagreed, or a
    sampled level 1 misjudged the bin, which the host checks before using the buffer.

    The gallop scorer's keys come from the fast division, and a block recomputes them exactly when one of them may
    lie on an edge of bin ``level`` (``_near_edges``; docs/performance.md: 0 to 0.1% of blocks), so every count
    is exact. ``EDGE_CHECK=False`` drops that branch: never launched, it is the common path ``bench/roofline.py``
    counts (static counts would add the rare branch to every block)."""
    WORDS: tl.constexpr = BLOCK // 32
    b = tl.program_id(0)
    rows = tl.arange(0, WORDS)
    lanes = tl.arange(0, 32)
    first = b.to(tl.int64) * BLOCK
    g_blk, w_blk = g_ptr + first, w_ptr + first
    offs = rows[:, None] * 32 + lanes[None, :]  # int32, from the block's first element
    if EVEN:
        mask = tl.full((WORDS, 32), 1, tl.int1)
    else:
        mask = offs < tl.minimum(n - first, BLOCK).to(tl.int32)
    keys = _keys(g_blk, w_blk, offs, mask, eps, tkey, first, SCORER, SCORER == 0)
    if SCORER == 0 and EDGE_CHECK:  # fast division: exact keys for the whole block if one may sit on a bin edge
        if tl.max(tl.max((mask & _near_edges(keys, level, SHIFT)).to(tl.int32), 1), 0) > 0:
            keys = _keys(g_blk, w_blk, offs, mask, eps, tkey, first, SCORER, False)
    lvl = keys >> SHIFT
    above = mask & (lvl > level)
    inbin = mask & (lvl == level)
    bad = mask & ((keys < 0) | ((keys >> _SHIFT1) > _INVALID_BIN))  # sign-bit keys (NaN with eps = 0), Inf, NaN
    bits = tl.full((32,), 1, tl.uint32) << lanes.to(tl.uint32)
    block = first_block + b
    tl.store(mask_ptr + block * WORDS + rows, tl.sum(tl.where(above, bits[None, :], 0), 1).to(tl.int32, bitcast=True))
    tl.store(above_ptr + block, tl.sum(tl.sum(above.to(tl.int32), 1), 0))
    tl.store(invalid_ptr + block, tl.sum(tl.sum(bad.to(tl.int32), 1), 0))
    per_word = tl.sum(inbin.to(tl.int32), 1)
    n_in = tl.sum(per_word, 0)
    if n_in > 0:
        words = tl.sum(tl.where(inbin, bits[None, :], 0), 1)
        start = tl.atomic_add(cand_count_ptr, n_in.to(tl.int64), sem="relaxed")  # only uniqueness matters
        slot = start + (tl.cumsum(per_word, 0) - per_word).to(tl.int64)
        if DENSE:  # many candidates (heavy ties): rank them by a scan over the block's keys
            pos = slot[:, None] + (tl.cumsum(inbin.to(tl.int32), 1) - 1).to(tl.int64)
            keep = inbin & (pos < capacity)
            exact = _keys(g_blk, w_blk, offs, keep, eps, tkey, first, SCORER, False)
            tl.store(cand_key_ptr + pos, exact, mask=keep)
            tl.store(cand_pos_ptr + pos, block.to(tl.int64) * BLOCK + offs, mask=keep)
        else:
            for _ in range(tl.max(per_word, 0)):
                low, lane = _lowest_bit(words)
                keep = (words != 0) & (slot < capacity)
                local = rows * 32 + lane
                tl.store(
                    cand_key_ptr + slot, _keys(g_blk, w_blk, local, keep, eps, tkey, first, SCORER, False), mask=keep
                )
                tl.store(cand_pos_ptr + slot, block.to(tl.int64) * BLOCK + local, mask=keep)
                words = words ^ low
                slot += 1


@triton.jit
def _set_bits_kernel(mask_ptr, pos_ptr, n, BLOCK: tl.constexpr):
    """mask bit ``pos[i]`` |= 1 for every i < n (the chosen candidates: bits that were 0)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    pos = tl.load(pos_ptr + offs, mask=keep, other=0)
    bit = tl.full((BLOCK,), 1, tl.uint32) << (pos & 31).to(tl.uint32)
    tl.atomic_or(mask_ptr + (pos >> 5), bit.to(tl.int32, bitcast=True), mask=keep, sem="relaxed")


@triton.jit
def _popcount_kernel(mask_ptr, counts_ptr, total_blocks, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """counts[block] = set bits of the block's ``BLOCK // 32`` mask words, for ``GROUP`` blocks a program."""
    WORDS: tl.constexpr = BLOCK // 32
    blocks = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    keep = blocks < total_blocks
    words = tl.load(mask_ptr + blocks[:, None] * WORDS + tl.arange(0, WORDS)[None, :], mask=keep[:, None], other=0)
    tl.store(counts_ptr + blocks, tl.sum(_popcount(words.to(tl.uint32, bitcast=True)), 1), mask=keep)


@triton.jit
def _compact_mask_kernel(
    mask_ptr,
    out_off_ptr,
    block_tensor_ptr,
    out_table_ptr,
    first_block_ptr,
    out_start_ptr,
    out_len_ptr,
    wide_ptr,
    total_blocks,
    WIDE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write the flat index (within its tensor) of every set mask bit, in order, into its tensor's output: one
    launch over every tensor (``GROUP`` blocks a program, which may span tensors; a word at a time, lowest bit
    first). Per tensor ``t`` the tables give its output's address, first block, the global offset of its first
    output and its output's length; ``out_off[block]`` is the exclusive scan of the per-block counts. A launch
    writes the tensors whose ``wide[t] == WIDE`` (int64 indices, else int32). Only the mask is read, never
    (grad, weight); stores stay inside each output."""
    WORDS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0).to(tl.int64)
    word = pid * GROUP * WORDS + tl.arange(0, GROUP * WORDS)
    block = word // WORDS
    inside = block < total_blocks
    t = tl.load(block_tensor_ptr + block, mask=inside, other=0)
    words = tl.load(mask_ptr + word, mask=inside, other=0).to(tl.uint32, bitcast=True)
    count = _popcount(words)  # every tensor's words: the scan must match out_off
    mine = inside & (tl.load(wide_ptr + t, mask=inside, other=0) == WIDE)
    slot = tl.load(out_off_ptr + pid * GROUP) + (tl.cumsum(count, 0) - count).to(tl.int64)
    slot -= tl.load(out_start_ptr + t, mask=inside, other=0)
    length = tl.load(out_len_ptr + t, mask=inside, other=0)
    first = (block - tl.load(first_block_ptr + t, mask=inside, other=0)) * BLOCK + (word % WORDS) * 32
    if WIDE:
        out = tl.load(out_table_ptr + t, mask=mine, other=0).to(tl.pointer_type(tl.int64))
    else:
        out = tl.load(out_table_ptr + t, mask=mine, other=0).to(tl.pointer_type(tl.int32))
    for _ in range(tl.max(count, 0)):
        low, lane = _lowest_bit(words)
        tl.store(out + slot, (first + lane).to(out.dtype.element_ty), mask=mine & (words != 0) & (slot < length))
        words = words ^ low
        slot += 1


@triton.jit
def _count_kernel(
    g_ptr, w_ptr, n, eps, tkey, threshold, first_block, above_ptr, ties_ptr, SCORER: tl.constexpr, BLOCK: tl.constexpr
):
    """Per block: above[block] = #{key > T}, ties[block] = #{key == T}."""
    b, offs, mask, keys = _block_keys(g_ptr, w_ptr, n, eps, tkey, SCORER, BLOCK)
    tl.store(above_ptr + first_block + b, tl.sum((mask & (keys > threshold)).to(tl.int32), 0))
    tl.store(ties_ptr + first_block + b, tl.sum((mask & (keys == threshold)).to(tl.int32), 0))


@triton.jit
def _compact_kernel(
    g_ptr,
    w_ptr,
    n,
    eps,
    tkey,
    threshold,
    first_block,
    out_ptr,
    out_off_ptr,
    tie_off_ptr,
    ties_wanted,
    SCORER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write, in index order, the keys > T and the ties whose global rank is below ``ties_wanted``.

    Ranks within a block are int32 scans (a block holds ``BLOCK`` keys); the tie scan runs only in blocks that hold
    a tie, and a block with nothing to take writes nothing."""
    b, offs, mask, keys = _block_keys(g_ptr, w_ptr, n, eps, tkey, SCORER, BLOCK)
    take = mask & (keys > threshold)
    tie = mask & (keys == threshold)
    if tl.sum(tie.to(tl.int32), 0) > 0:
        tie_rank = tl.load(tie_off_ptr + first_block + b) + (tl.cumsum(tie.to(tl.int32), 0) - 1).to(tl.int64)
        take = take | (tie & (tie_rank < ties_wanted))
    if tl.sum(take.to(tl.int32), 0) > 0:
        pos = tl.load(out_off_ptr + first_block + b) + (tl.cumsum(take.to(tl.int32), 0) - 1).to(tl.int64)
        tl.store(out_ptr + pos, offs.to(out_ptr.dtype.element_ty), mask=take)


def _hist_programs(device: torch.device, n_blocks: int) -> int:
    """Persistent programs for a histogram pass: up to 4 per SM, but each loops over >= 16 blocks, so the
    2048 global atomics a program ends with stay below 1/16 of the elements it reads."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_blocks // 16, 4 * sms))
    return max(1, min(n_blocks, 4))  # the interpreter: few programs, several loop iterations each


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    c = torch.cumsum(x, 0)
    return c - x


class _Inputs:
    """The flat (grad, weight) pointers of every tensor, with block numbering and the random scorer's keys."""

    def __init__(self, grads, weights, scorer: str, eps: float, seed: int) -> None:
        self.device = weights[0].device
        self.scorer, self.sid, self.eps = scorer, SCORER_IDS[scorer], eps
        self.w = [w.reshape(-1) if w.is_contiguous() else w.contiguous().reshape(-1) for w in weights]
        self.g = [
            None if g is None else (g.reshape(-1) if g.is_contiguous() else g.contiguous().reshape(-1)) for g in grads
        ]
        self.sizes = [w.numel() for w in self.w]
        self.n_blocks = [triton.cdiv(n, BLOCK) for n in self.sizes]
        self.first_block = [0]
        for nb in self.n_blocks:
            self.first_block.append(self.first_block[-1] + nb)
        self.total_blocks = self.first_block[-1]
        self.tkeys = [random_seed_key(seed, pos) for pos in range(len(weights))]

    def nonempty(self):
        """(position, n, grad pointer, weight pointer) of every non-empty tensor; a tensor that is not read (a
        scorer without grads) aliases the weight."""
        for pos, n in enumerate(self.sizes):
            if n:
                yield pos, n, (self.w[pos] if self.g[pos] is None else self.g[pos]), self.w[pos]


def _histogram(x: _Inputs, prefix: int, prefix_shift: int, bin_shift: int, nbins: int, stride: int = 1):
    """Per-tensor histograms [T, nbins] of key bits ``bin_shift..`` among keys whose ``key >> prefix_shift``
    equals ``prefix`` (``prefix_shift == 32``: all keys), over every ``stride``-th block of each tensor. A sampled
    one (``stride > 1``) only guides the exact passes, so it scores with the fast division."""
    hist = torch.zeros((len(x.sizes), nbins), dtype=torch.int64, device=x.device)
    for pos, n, g, w in x.nonempty():
        n_blocks = triton.cdiv(x.n_blocks[pos], stride)
        _histogram_kernel[(_hist_programs(x.device, n_blocks),)](
            g,
            w,
            hist[pos],
            n,
            x.eps,
            x.tkeys[pos],
            prefix,
            n_blocks,
            stride,
            PREFIX_SHIFT=prefix_shift,
            BIN_SHIFT=bin_shift,
            NBINS=nbins,
            EVEN=n % BLOCK == 0,
            APPROX=stride > 1 and x.scorer == "gallop",
            SCORER=x.sid,
            BLOCK=BLOCK,
        )
    return hist


def _level1_histogram(x: _Inputs, stride: int = 1) -> torch.Tensor:
    """Per-tensor 2048-bin histograms [T, 2048] of key bits 30..20 (every ``stride``-th block); no host sync."""
    return _histogram(x, 0, 32, SHIFT1, NB1, stride)


def _pick_bin(x: _Inputs, hist: torch.Tensor, k: int, sampled: bool) -> tuple[int, int, int, float] | None:
    """From a level-1 histogram [T, 2048]: (b1, the keys read above it, in it, the scale from keys read to all
    keys), in one host sync; raises on a NaN/Inf score read (names the tensor). A sampled histogram targets the
    ``k * read / total``-th key, and a NaN/Inf key in it (fast division) gives None: the exact path decides."""
    total = hist.sum(0)
    read = total.sum()
    if sampled:
        target = torch.clamp(torch.round(k * read.double() / sum(x.sizes)), min=1).to(torch.int64)
    else:
        target = torch.full_like(read, k)
    desc = total.flip(0).cumsum(0)
    pos = torch.searchsorted(desc, torch.minimum(target, read).reshape(1)).reshape(())
    b1 = NB1 - 1 - pos
    bad = hist[:, INVALID_BIN + 1 :].sum(1)
    first_bad = torch.where(bad > 0, torch.arange(bad.numel(), device=bad.device), bad.numel()).min()
    b1, above, n_in, read, first_bad = torch.stack([b1, desc[pos] - total[b1], total[b1], read, first_bad]).tolist()
    if first_bad < len(x.sizes):
        if sampled:
            return None
        raise nonfinite_score_error(x.scorer, first_bad)
    return b1, above, n_in, sum(x.sizes) / max(read, 1)


class _Collected:
    """The collect pass's outputs: the mask of keys surely selected (bit per element, [blocks * BLOCK // 32]
    int32 words), per-block counts of them and of NaN/Inf keys, and the candidate buffer (keys, global positions,
    the count found, which may exceed the buffer)."""

    def __init__(self, x: _Inputs, level: int, shift: int, capacity: int) -> None:
        dev = x.device
        self.mask = torch.empty(x.total_blocks * (BLOCK // 32), dtype=torch.int32, device=dev)
        self.above = torch.empty(x.total_blocks, dtype=torch.int32, device=dev)
        self.invalid = torch.empty(x.total_blocks, dtype=torch.int32, device=dev)
        self.key = torch.empty(capacity, dtype=torch.int32, device=dev)
        self.pos = torch.empty(capacity, dtype=torch.int64, device=dev)
        count = torch.zeros(1, dtype=torch.int64, device=dev)
        self.dense = DENSE_SPACING * capacity >= sum(x.sizes)  # a candidate every two words or more: scan
        for pos, n, g, w in x.nonempty():
            _collect_kernel[(x.n_blocks[pos],)](
                g,
                w,
                n,
                x.eps,
                x.tkeys[pos],
                level,
                x.first_block[pos],
                self.mask,
                self.above,
                self.invalid,
                self.key,
                self.pos,
                count,
                capacity,
                SHIFT=shift,
                DENSE=self.dense,
                EVEN=n % BLOCK == 0,
                SCORER=x.sid,
                BLOCK=BLOCK,
            )
        self.capacity = capacity
        # one host sync for the checks every caller makes
        self.found, self.n_above, n_invalid = torch.stack([count[0], self.above.sum(), self.invalid.sum()]).tolist()
        if n_invalid:
            block = int(torch.nonzero(self.invalid)[0])
            raise nonfinite_score_error(x.scorer, bisect.bisect_right(x.first_block, block) - 1)


def _chosen_candidates(x: _Inputs, c: _Collected, need: int) -> torch.Tensor:
    """Global positions of the ``need`` best candidates: larger key first, ties to the lower position (the lower
    (tensor, index)), exactly the reference's rule."""
    key, pos = c.key[: c.found], c.pos[: c.found]
    if x.total_blocks * BLOCK <= 1 << 32:  # one sort on (key, -position) packed into an int64
        packed = (key.to(torch.int64) << 32) | ((1 << 32) - 1 - pos)
        order = torch.sort(packed, descending=True).indices
    else:  # two stable sorts: position ascending, then key descending
        by_pos = torch.sort(pos, stable=True).indices
        order = by_pos[torch.sort(key[by_pos], descending=True, stable=True).indices]
    return pos[order[:need]]


def _compact_mask(x: _Inputs, k: int, c: _Collected, chosen: torch.Tensor) -> list[torch.Tensor]:
    """Add the chosen candidates to the mask, count its bits per block, and write every tensor's selected
    indices in order from the mask alone, straight into the outputs (one launch per index dtype; one host sync
    for the per-tensor counts)."""
    dev = x.device
    if chosen.numel():
        _set_bits_kernel[(triton.cdiv(chosen.numel(), SET_BLOCK),)](c.mask, chosen, chosen.numel(), BLOCK=SET_BLOCK)
    del c.key, c.pos  # free the candidate buffer before the outputs are allocated
    counts = torch.empty(x.total_blocks, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(x.total_blocks, GROUP),)
    _popcount_kernel[grid](c.mask, counts, x.total_blocks, GROUP=GROUP, BLOCK=BLOCK)
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    first_block = torch.tensor(x.first_block, dtype=torch.int64, device=dev)
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), ends])[first_block].tolist()
    if bounds[-1] != k:
        raise RuntimeError(
            f"select_topk: the selection mask holds {bounds[-1]} entries where {k} were chosen. This is a "
            f"gallop_kernels bug: please report it (GALLOP_BACKEND=reference gives the exact result meanwhile)"
        )
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    outs = [torch.empty(m, dtype=index_dtype(n), device=dev) for m, n in zip(lengths, x.sizes)]
    wide = [o.dtype == torch.int64 for o in outs]
    positions = torch.arange(len(outs), dtype=torch.int32, device=dev)
    n_blocks = torch.tensor(x.n_blocks, dtype=torch.int64, device=dev)
    tables = torch.tensor([[o.data_ptr() for o in outs], bounds[:-1], lengths, wide], dtype=torch.int64)
    out_table, out_start, out_len, wide_t = tables.to(dev)  # one copy to the device for the four tables
    block_tensor = torch.repeat_interleave(positions, n_blocks, output_size=x.total_blocks)
    for flag in sorted(set(wide)):
        _compact_mask_kernel[grid](
            c.mask,
            ends - counts,
            block_tensor,
            out_table,
            first_block,
            out_start,
            out_len,
            wide_t,
            x.total_blocks,
            WIDE=int(flag),
            GROUP=GROUP,
            BLOCK=BLOCK,
        )
    return outs


def _select_sampled(x: _Inputs, k: int) -> list[torch.Tensor] | None:
    """Level 1 from every ``SAMPLE_STRIDE``-th block picks the bin likely to hold the k-th key and sizes the
    candidate buffer; the collect pass then counts exactly. Used only if the exact counts confirm the bin
    (above < k <= above + candidates) and the buffer held every candidate; else None (the exact path runs)."""
    picked = _pick_bin(x, _level1_histogram(x, SAMPLE_STRIDE), k, sampled=True)
    if picked is None:
        return None
    b1, _, n_in, scale = picked
    capacity = int(1.25 * n_in * scale) + 4 * BLOCK
    if capacity > CANDIDATE_CAP:
        return None  # heavy ties: the exact path resolves them by passes
    c = _Collected(x, b1, SHIFT1, capacity)
    if c.found > capacity or not c.n_above < k <= c.n_above + c.found:
        return None
    return _compact_mask(x, k, c, _chosen_candidates(x, c, k - c.n_above))


def _resolve_by_passes(x: _Inputs, b1: int, need: int):
    """Heavy ties (too many candidates to buffer): two more histogram passes give the threshold, a count pass the
    per-block counts. Returns (threshold, per-block above, per-block ties)."""
    b2, above_b2 = threshold_bin(_histogram(x, b1, SHIFT1, SHIFT2, NB2).sum(0), need)
    prefix2 = (b1 << (SHIFT1 - SHIFT2)) | b2
    b3, _ = threshold_bin(_histogram(x, prefix2, SHIFT2, 0, NB3).sum(0), need - above_b2)
    threshold = (prefix2 << SHIFT2) | b3
    above32 = torch.zeros(x.total_blocks, dtype=torch.int32, device=x.device)
    ties32 = torch.zeros(x.total_blocks, dtype=torch.int32, device=x.device)
    for pos, n, g, w in x.nonempty():
        _count_kernel[(x.n_blocks[pos],)](
            g, w, n, x.eps, x.tkeys[pos], threshold, x.first_block[pos], above32, ties32, SCORER=x.sid, BLOCK=BLOCK
        )
    return threshold, above32.to(torch.int64), ties32.to(torch.int64)


def _compact(x: _Inputs, k: int, threshold: int, above: torch.Tensor, ties: torch.Tensor) -> list[torch.Tensor]:
    """Pass 3: ordered compaction. Ties are taken in global (tensor, index) order up to the quota."""
    ties_wanted = k - int(above.sum())
    tie_off = _exclusive_cumsum(ties)
    taken = torch.minimum(torch.clamp(ties_wanted - tie_off, min=0), ties)
    selected = above + taken
    # per-tensor totals and per-block output offsets from one inclusive scan over all blocks
    cs0 = torch.cat([torch.zeros(1, dtype=torch.int64, device=x.device), torch.cumsum(selected, 0)])
    starts = torch.tensor(x.first_block, dtype=torch.int64, device=x.device)
    counts = (cs0[starts[1:]] - cs0[starts[:-1]]).tolist()
    block_start = torch.repeat_interleave(starts[:-1], torch.tensor(x.n_blocks, dtype=torch.int64, device=x.device))
    out_off = cs0[:-1] - cs0[block_start]
    outs = [torch.empty(counts[pos], dtype=index_dtype(n), device=x.device) for pos, n in enumerate(x.sizes)]
    for pos, n, g, w in x.nonempty():
        if counts[pos]:
            _compact_kernel[(x.n_blocks[pos],)](
                g,
                w,
                n,
                x.eps,
                x.tkeys[pos],
                threshold,
                x.first_block[pos],
                outs[pos],
                out_off,
                tie_off,
                ties_wanted,
                SCORER=x.sid,
                BLOCK=BLOCK,
            )
    return outs


def select_topk(
    grads: Sequence[torch.Tensor | None],
    weights: Sequence[torch.Tensor],
    k: int,
    *,
    scorer: str = "gallop",
    eps: float = 1e-8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Triton twin of ``reference.select_topk`` (inputs validated by ``gallop_kernels.select_topk``)."""
    x = _Inputs(grads, weights, scorer, eps, seed)
    if x.total_blocks >= SAMPLE_MIN_BLOCKS:
        got = _select_sampled(x, k)
        if got is not None:
            return got
    picked = _pick_bin(x, _level1_histogram(x), k, sampled=False)
    assert picked is not None  # an exact level 1 raises on NaN/Inf instead
    b1, above_b1, n_in, _ = picked
    if n_in > CANDIDATE_CAP:  # heavy ties: the threshold by two more histogram passes
        return _compact(x, k, *_resolve_by_passes(x, b1, k - above_b1))
    c = _Collected(x, b1, SHIFT1, n_in)
    if (c.found, c.n_above) != (n_in, above_b1):
        raise RuntimeError(
            f"select_topk: the collect pass found {c.n_above} keys above the threshold bin and {c.found} in it where "
            f"the histogram counted {above_b1} and {n_in}; the two passes must compute the same keys. This is a "
            f"gallop_kernels bug: please report it (GALLOP_BACKEND=reference gives the exact result meanwhile)"
        )
    return _compact_mask(x, k, c, _chosen_candidates(x, c, k - above_b1))
