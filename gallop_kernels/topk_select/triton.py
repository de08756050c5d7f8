"""Triton: exact global top-k over many tensors by radix select on 32-bit score keys, fused with scoring.

Keys are the same as the reference's (``gallop_kernels._common``): a larger key is selected first; finite scores
map to [0, 0x7F7FFFFF]; NaN/Inf land in histogram bins 0x7F8..0x7FF of the first level, which no finite key reaches.
Scores are computed in registers from (grad, weight) in every pass and never stored.

Passes (each one launch per tensor; "block" = ``BLOCK`` consecutive elements, numbered globally across tensors),
the host steps named like the reference's:

1. ``_level1_histogram`` (``_histogram_kernel``): persistent programs build a 2048-bin histogram of key bits
   30..20 (``tl.histogram``, which lowers to shared-memory atomics) and add it to the tensor's row of a global
   [T, 2048] histogram once per program. Host: the bin ``b1`` holding the k-th key, ``need`` = how many to take
   from it, the per-tensor NaN/Inf check.
2. ``_collect_candidates`` (``_collect_kernel``, when the candidates fit the buffer): per block, count the keys
   above ``b1`` and append the keys in ``b1`` with their block number to a candidate buffer (one atomic per
   block; order irrelevant). Host (torch, on the candidates only): the exact threshold key ``T``; per block, how
   many keys are > T and == T. ``_resolve_by_passes`` instead, when bin ``b1`` holds more than ``CANDIDATE_CAP``
   keys (heavy ties): two more histogram passes (bits 19..9, then 8..0) give ``T``, and ``_count_kernel`` counts
   > T / == T per block.
3. ``_compact`` (``_compact_kernel``): each block writes, in index order, its keys > T and the ties whose global
   rank (in (tensor, index) order, from an exclusive scan of the per-block tie counts) is below the tie quota, at
   offsets from an exclusive scan of the per-block selected counts. The result is exactly k indices, sorted per
   tensor, identical to the reference.

So a small call reads every (grad, weight) pair three times; heavy ties cost two more reads.

A large call (``SAMPLE_MIN_BLOCKS`` blocks or more) builds level 1 from every ``SAMPLE_STRIDE``-th block only
(``_sampled_candidates``): the sample picks ``b1`` and sizes the candidate buffer, the collect pass counts exactly
(and counts NaN/Inf keys per block, which the sample cannot vouch for), and the host accepts the bin only if the
exact counts confirm it (``above < k <= above + candidates``, every candidate buffered); otherwise the exact
path above runs. The result is the same either way; the common case reads the pairs 2 + 1/16 times, and on
triton 3.6, whose ``tl.histogram`` costs about 8 warp instructions an element, skips most of that cost.
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
SAMPLE_STRIDE = 16  # a large call's level-1 histogram reads every 16th block of each tensor
SAMPLE_MIN_BLOCKS = 4096  # ... when the call has at least this many blocks (8M elements); else all of them
NB1, SHIFT1 = 2048, 20  # level 1: key bits 30..20 (plus the invalid bins 0x7F8..0x7FF)
NB2, SHIFT2 = 2048, 9  # level 2: key bits 19..9
NB3 = 512  # level 3: key bits 8..0
INVALID_BIN = MAX_KEY >> SHIFT1  # 0x7F7: bins above it only hold NaN/Inf scores
_INVALID_BIN = tl.constexpr(INVALID_BIN)  # the same, readable inside a compiled kernel


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _keys(g_ptr, w_ptr, offs, mask, eps, tkey, SCORER: tl.constexpr):
    """Int32 keys of the elements at ``offs`` (int64 flat indices); masked lanes get garbage, never used."""
    if SCORER == 4:  # random: mix32(mix32(tkey ^ index_hi) ^ index_lo) >> 2
        lo = (offs & 0xFFFFFFFF).to(tl.uint32)
        hi = (offs >> 32).to(tl.uint32)
        h = _mix32(hi ^ tl.cast(tkey, tl.uint32))
        h = _mix32(h ^ lo)
        return (h >> 2).to(tl.int32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SCORER == 2:  # magnitude: 0x7F7FFFFF - bits(|w|)
        return 0x7F7FFFFF - tl.abs(w).to(tl.int32, bitcast=True)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SCORER == 0:  # gallop: |g| / (|w| + eps), IEEE division like torch
        s = tl.div_rn(tl.abs(g), tl.abs(w) + eps)
    elif SCORER == 1:  # gradient: |g|
        s = tl.abs(g)
    else:  # product: |g * w|
        s = tl.abs(g * w)
    return s.to(tl.int32, bitcast=True)


@triton.jit
def _block_keys(g_ptr, w_ptr, n, eps, tkey, SCORER: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block: (block number, int64 flat offsets, in-range mask, keys)."""
    b = tl.program_id(0)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    return b, offs, mask, _keys(g_ptr, w_ptr, offs, mask, eps, tkey, SCORER)


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
    SCORER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """hist[bin] += #{keys with (key >> PREFIX_SHIFT) == prefix} by bin (key >> BIN_SHIFT) & (NBINS - 1).

    PREFIX_SHIFT == 32 means no prefix filter (level 1, where negative keys must land in the invalid bins).
    Persistent: program p handles blocks p, p + grid, ... of the ``n_blocks`` blocks read, which are every
    ``block_stride``-th block of the tensor (1: all of them); one histogram add per program.
    """
    pid = tl.program_id(0)
    acc = tl.zeros((NBINS,), dtype=tl.int32)
    excluded = 0
    for b in range(pid, n_blocks, tl.num_programs(0)):
        offs = tl.cast(b, tl.int64) * block_stride * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        keys = _keys(g_ptr, w_ptr, offs, mask, eps, tkey, SCORER)
        if PREFIX_SHIFT < 32:
            mask = mask & ((keys >> PREFIX_SHIFT) == prefix)
        bins = tl.where(mask, (keys >> BIN_SHIFT) & (NBINS - 1), 0)
        acc += tl.histogram(bins, NBINS)  # excluded lanes were counted in bin 0: subtracted below
        excluded += BLOCK - tl.sum(mask.to(tl.int32), 0)
    acc -= tl.where(tl.arange(0, NBINS) == 0, excluded, 0)
    tl.atomic_add(hist_ptr + tl.arange(0, NBINS), acc.to(tl.int64), sem="relaxed")  # order-free sums


@triton.jit
def _collect_kernel(
    g_ptr,
    w_ptr,
    n,
    eps,
    tkey,
    b1,
    first_block,
    above_ptr,
    cand_key_ptr,
    cand_block_ptr,
    cand_count_ptr,
    capacity,
    invalid_ptr,
    SHIFT: tl.constexpr,
    CHECK_INVALID: tl.constexpr,
    SCORER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per block: above[block] = #{key >> SHIFT > b1}; append (key, block) for every key >> SHIFT == b1; with
    ``CHECK_INVALID``, invalid[block] = #{NaN/Inf keys} (a sampled level 1 cannot vouch for unread blocks).

    The count is bumped by every block's full tally, but stores stay inside ``capacity`` (the buffer the histogram
    sized): a count above it means the passes disagreed, or a sampled level 1 misjudged the bin, which the host
    checks before using the buffer."""
    b, offs, mask, keys = _block_keys(g_ptr, w_ptr, n, eps, tkey, SCORER, BLOCK)
    level1 = keys >> SHIFT
    block = first_block + b
    tl.store(above_ptr + block, tl.sum((mask & (level1 > b1)).to(tl.int32), 0))
    if CHECK_INVALID:  # sign-bit keys (NaN, eps = 0) and the bins above INVALID_BIN (Inf, NaN)
        bad = mask & ((keys < 0) | (level1 > _INVALID_BIN))
        tl.store(invalid_ptr + block, tl.sum(bad.to(tl.int32), 0))
    in_bin = mask & (level1 == b1)
    n_in = tl.sum(in_bin.to(tl.int32), 0)
    if n_in > 0:
        start = tl.atomic_add(cand_count_ptr, n_in.to(tl.int64), sem="relaxed")  # only uniqueness matters
        pos = start + (tl.cumsum(in_bin.to(tl.int32), 0) - 1).to(tl.int64)  # a block's ranks fit int32
        keep = in_bin & (pos < capacity)
        tl.store(cand_key_ptr + pos, keys, mask=keep)
        tl.store(cand_block_ptr + pos, block.to(tl.int64) + tl.zeros((BLOCK,), dtype=tl.int64), mask=keep)


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
    equals ``prefix`` (``prefix_shift == 32``: all keys), over every ``stride``-th block of each tensor."""
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
            SCORER=x.sid,
            BLOCK=BLOCK,
        )
    return hist


def _level1_histogram(x: _Inputs, stride: int = 1) -> torch.Tensor:
    """The 2048-bin histogram of key bits 30..20 over all tensors (every ``stride``-th block); raises on a NaN/Inf
    score it reads (names the tensor)."""
    hist = _histogram(x, 0, 32, SHIFT1, NB1, stride)
    bad_pos = torch.nonzero(hist[:, INVALID_BIN + 1 :].sum(1)).reshape(-1)
    if bad_pos.numel():
        raise nonfinite_score_error(x.scorer, int(bad_pos[0]))
    return hist.sum(0)


def _collect(x: _Inputs, b1: int, capacity: int, check_invalid: bool):
    """Pass 2 over every block: per-block counts above bin ``b1`` (and of NaN/Inf keys, with ``check_invalid``)
    and up to ``capacity`` candidate keys inside it with their block numbers. Returns (above int32 [blocks],
    candidate keys, candidate blocks, the candidate count [1] on the device, invalid int32 [blocks] or None)."""
    above32 = torch.zeros(x.total_blocks, dtype=torch.int32, device=x.device)
    invalid32 = torch.zeros(x.total_blocks, dtype=torch.int32, device=x.device) if check_invalid else None
    cand_key = torch.empty(capacity, dtype=torch.int32, device=x.device)
    cand_block = torch.empty(capacity, dtype=torch.int64, device=x.device)
    cand_count = torch.zeros(1, dtype=torch.int64, device=x.device)
    for pos, n, g, w in x.nonempty():
        _collect_kernel[(x.n_blocks[pos],)](
            g,
            w,
            n,
            x.eps,
            x.tkeys[pos],
            b1,
            x.first_block[pos],
            above32,
            cand_key,
            cand_block,
            cand_count,
            capacity,
            above32 if invalid32 is None else invalid32,
            SHIFT=SHIFT1,
            CHECK_INVALID=check_invalid,
            SCORER=x.sid,
            BLOCK=BLOCK,
        )
    return above32, cand_key, cand_block, cand_count, invalid32


def _resolve(x: _Inputs, threshold: int, above32, cand_key, cand_block):
    """Per-block counts of keys > T (above the bin, plus the candidates above T) and == T."""
    above = above32.to(torch.int64)
    above += torch.bincount(cand_block[cand_key > threshold], minlength=x.total_blocks)
    ties = torch.bincount(cand_block[cand_key == threshold], minlength=x.total_blocks)
    return threshold, above, ties


def _collect_candidates(x: _Inputs, b1: int, n_cand: int, need: int):
    """Pass 2 after an exact level 1: the ``n_cand`` keys of bin ``b1`` are buffered and the exact threshold
    resolved among them. Returns (threshold, per-block above, per-block ties)."""
    above32, cand_key, cand_block, cand_count, _ = _collect(x, b1, n_cand, check_invalid=False)
    kth = torch.sort(cand_key, descending=True).values[need - 1]
    collected, threshold = torch.stack([cand_count[0], kth.to(torch.int64)]).tolist()  # one sync for both
    if collected != n_cand:
        raise RuntimeError(
            f"select_topk: the collect pass found {collected} keys in the threshold bin where the histogram counted "
            f"{n_cand}; the two passes must compute the same keys. This is a gallop_kernels bug: please report it "
            f"(GALLOP_BACKEND=reference gives the exact result meanwhile)"
        )
    return _resolve(x, threshold, above32, cand_key, cand_block)


def _sampled_candidates(x: _Inputs, k: int):
    """Level 1 from every ``SAMPLE_STRIDE``-th block picks the bin likely to hold the k-th key and sizes the
    candidate buffer; the collect pass then counts exactly. The result is used only if the exact counts confirm the
    bin (above < k <= above + candidates) and the buffer held every candidate; else None (the exact path runs).
    Returns (threshold, per-block above, per-block ties) or None."""
    hist = _level1_histogram(x, SAMPLE_STRIDE)
    read = int(hist.sum())
    if read == 0:
        return None
    scale = sum(x.sizes) / read
    b1, _ = threshold_bin(hist, max(1, min(read, round(k / scale))))
    capacity = int(1.25 * float(hist[b1]) * scale) + 4 * BLOCK
    if capacity > CANDIDATE_CAP:
        return None  # heavy ties: the exact path resolves them by passes
    above32, cand_key, cand_block, cand_count, invalid32 = _collect(x, b1, capacity, check_invalid=True)
    collected, above, invalid = torch.stack([cand_count[0], above32.sum(), invalid32.sum()]).tolist()
    if invalid:
        block = int(torch.nonzero(invalid32)[0])
        raise nonfinite_score_error(x.scorer, bisect.bisect_right(x.first_block, block) - 1)
    if collected > capacity or not above < k <= above + collected:
        return None
    cand_key, cand_block = cand_key[:collected], cand_block[:collected]
    threshold = int(torch.sort(cand_key, descending=True).values[k - above - 1])
    return _resolve(x, threshold, above32, cand_key, cand_block)


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
        sampled = _sampled_candidates(x, k)
        if sampled is not None:
            return _compact(x, k, *sampled)
    hist = _level1_histogram(x)
    b1, above_b1 = threshold_bin(hist, k)
    need = k - above_b1
    n_cand = int(hist[b1])
    if n_cand <= CANDIDATE_CAP:
        threshold, above, ties = _collect_candidates(x, b1, n_cand, need)
    else:
        threshold, above, ties = _resolve_by_passes(x, b1, need)
    return _compact(x, k, threshold, above, ties)
