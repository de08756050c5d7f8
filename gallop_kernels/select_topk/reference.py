"""Pure-PyTorch exact global top-k selection: the CPU path and the oracle for the Triton kernel.

Keys as in ``gallop_kernels._common``. The exact k-th largest key is found by a two-level radix select (16 high
bits, then 15 low bits) over histograms built chunk by chunk, so no score tensor larger than one chunk ever exists:

1. ``_level1_histogram``: a 65,536-bin histogram of the 16 high key bits over all tensors (``torch.bincount``);
   its bins above 0xFEFF only hold non-finite scores, so the NaN/Inf check is free.
2. ``_collect_candidates``: everything above the threshold bin is selected; the keys inside it (the candidates,
   20 bytes each: tensor position, index and low bits) are buffered, and a histogram of their 15 low bits resolves
   the exact threshold with its tie quota (``_resolve_candidates``). With more than ``CANDIDATE_CAP`` candidates
   (heavy ties) ``_resolve_by_passes`` instead runs a low-bits histogram pass and a compaction pass.
3. ``_sorted_outputs``: each tensor's indices, sorted, in its index dtype.

Inputs are assumed validated (``gallop_kernels.select_topk`` does it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .._common import MAX_KEY, MIX1, MIX2, index_dtype, nonfinite_score_error, random_seed_key, threshold_bin

HI_SHIFT = 15  # the first pass resolves key >> 15 (16 bits), the second the low 15 bits
N_HI = 1 << 16
N_LO = 1 << HI_SHIFT
INVALID_HI_BIN = MAX_KEY >> HI_SHIFT  # 0xFEFF: bins above it only hold non-finite scores
CHUNK = 1 << 20  # elements scored at once: bounds the extra memory of the reference path
CANDIDATE_CAP = 1 << 22  # candidates buffered in memory (20 bytes each) before falling back to a third pass
_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------- hashing
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """Low 32 bits of x * c for int64 x in [0, 2**32), without overflowing int64."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xorshift-multiply), on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX2)
    return x ^ (x >> 16)


def random_keys(seed: int, position: int, flat_index: torch.Tensor) -> torch.Tensor:
    """``random`` scorer keys: ``mix32(mix32(tensor_key ^ index_hi) ^ index_lo) >> 2`` as int32 in [0, 2**30)."""
    tkey = random_seed_key(seed, position)
    h = _mix32((flat_index >> 32) ^ tkey)
    h = _mix32(h ^ (flat_index & _M32))
    return (h >> 2).to(torch.int32)


# ---------------------------------------------------------------------------------------------------- scores
def score_keys(
    g: torch.Tensor | None,
    w: torch.Tensor,
    scorer: str,
    eps: float,
    seed: int,
    position: int,
    start: int,
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Int32 keys of the flat chunk ``w`` (and ``g``), whose first element has flat index ``start``.

    ``buffers``: two fp32 scratch tensors of at least ``w.numel()`` elements, reused across chunks so the hot
    loop allocates nothing (the keys are returned as a view of the first one).
    """
    n = w.numel()
    if scorer == "random":
        idx = torch.arange(start, start + n, dtype=torch.int64, device=w.device)
        return random_keys(seed, position, idx)
    if buffers is None:
        buffers = (
            torch.empty(n, dtype=torch.float32, device=w.device),
            torch.empty(n, dtype=torch.float32, device=w.device),
        )
    s, tmp = buffers[0][:n], buffers[1][:n]
    if scorer == "magnitude":
        torch.abs(w, out=s) if w.dtype == torch.float32 else s.copy_(w).abs_()
        keys = s.view(torch.int32)
        return torch.sub(MAX_KEY, keys, out=keys)
    assert g is not None  # the scorers below read gradients (checked by the public API)
    torch.abs(g, out=s) if g.dtype == torch.float32 else s.copy_(g).abs_()  # never writes the caller's grad
    if scorer == "gallop":
        torch.abs(w, out=tmp) if w.dtype == torch.float32 else tmp.copy_(w).abs_()
        s.div_(tmp.add_(eps))
    elif scorer == "product":
        s.mul_(w).abs_()
    return s.view(torch.int32)


def scores(
    g: torch.Tensor | None, w: torch.Tensor, scorer: str, eps: float = 1e-8, seed: int = 0, position: int = 0
) -> torch.Tensor:
    """The fp32 score of every element of one tensor (for tests and small inputs; selection never calls it).

    For ``magnitude`` this is ``-|w|`` and for ``random`` the hash as a float, so larger is always better.
    """
    keys = score_keys(None if g is None else g.reshape(-1), w.reshape(-1), scorer, eps, seed, position, 0)
    if scorer == "magnitude":
        return -(MAX_KEY - keys).view(torch.float32).reshape(w.shape)
    if scorer == "random":
        return keys.to(torch.float64).reshape(w.shape)
    return keys.view(torch.float32).reshape(w.shape)


def _chunks(g: torch.Tensor | None, w: torch.Tensor):
    gf = None if g is None else g.reshape(-1)
    wf = w.reshape(-1)
    n = wf.numel()
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        yield start, (None if gf is None else gf[start:end]), wf[start:end]


class _Keys:
    """The keys of all tensors, chunk by chunk, computed into reused scratch buffers (nothing larger than a chunk)."""

    def __init__(self, grads, weights, scorer: str, eps: float, seed: int) -> None:
        self.grads, self.weights = grads, weights
        self.scorer, self.eps, self.seed = scorer, eps, seed
        self.device = weights[0].device
        width = min(CHUNK, max(w.numel() for w in weights))
        self.buffers = (
            torch.empty(width, dtype=torch.float32, device=self.device),
            torch.empty(width, dtype=torch.float32, device=self.device),
        )
        self.shifted = torch.empty(width, dtype=torch.int32, device=self.device)

    def of(self, pos: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, keys) for each chunk of tensor ``pos``; the keys are a view of a scratch buffer."""
        for start, gc, wc in _chunks(self.grads[pos], self.weights[pos]):
            yield start, score_keys(gc, wc, self.scorer, self.eps, self.seed, pos, start, self.buffers)

    def __len__(self) -> int:
        return len(self.weights)


def _level1_histogram(keys: _Keys) -> torch.Tensor:
    """Histogram of the 16 high key bits over all tensors; raises on a NaN/Inf score (it names the tensor)."""
    hist = torch.zeros(N_HI, dtype=torch.int64, device=keys.device)
    for pos in range(len(keys)):
        local = torch.zeros(N_HI, dtype=torch.int64, device=keys.device)
        for _, k in keys.of(pos):
            hi = torch.bitwise_right_shift(k, HI_SHIFT, out=keys.shifted[: k.numel()])
            # A key with its sign bit set (a NaN score with the sign bit, e.g. 0/0 with eps=0, or magnitude's key of a
            # non-finite |w|) shifts to a negative bin: fold it into the invalid bins, which raise below.
            hi.bitwise_and_(0xFFFF)
            local += torch.bincount(hi, minlength=N_HI)
        if int(local[INVALID_HI_BIN + 1 :].sum().item()):
            raise nonfinite_score_error(keys.scorer, pos)
        hist += local
    return hist


def _collect_candidates(keys: _Keys, b_hi: int, picked: list[list[torch.Tensor]]):
    """Append every index above bin ``b_hi`` to ``picked``; return the candidates inside it as (positions, indices,
    low key bits), in (tensor position, flat index) order."""
    bin_lo, bin_end = b_hi << HI_SHIFT, (b_hi + 1) << HI_SHIFT  # bin b_hi holds keys in [bin_lo, bin_end)
    cand_pos, cand_idx, cand_lo = [], [], []
    for pos in range(len(keys)):
        for start, k in keys.of(pos):
            hits = torch.nonzero(k >= bin_lo).reshape(-1)  # ~k/N of the chunk: cheap to split further
            hit_keys = k[hits]
            above = hit_keys >= bin_end
            picked[pos].append(hits[above] + start)
            in_bin = ~above
            if bool(in_bin.any()):
                cand_idx.append(hits[in_bin] + start)
                cand_lo.append(hit_keys[in_bin] & (N_LO - 1))
                cand_pos.append(torch.full((cand_idx[-1].numel(),), pos, dtype=torch.int64, device=keys.device))
    return torch.cat(cand_pos), torch.cat(cand_idx), torch.cat(cand_lo)


def _resolve_candidates(candidates, need: int, picked: list[list[torch.Tensor]]) -> None:
    """Take the ``need`` largest candidates (ties to the lower (position, index)) into ``picked``."""
    c_pos, c_idx, c_lo = candidates
    b_lo, above_lo = threshold_bin(torch.bincount(c_lo, minlength=N_LO), need)
    take = c_lo > b_lo
    ties = torch.nonzero(c_lo == b_lo).reshape(-1)[: need - above_lo]  # candidates are in (tensor, index) order
    take[ties] = True
    for pos in torch.unique(c_pos[take]).tolist():
        picked[pos].append(c_idx[take & (c_pos == pos)])


def _resolve_by_passes(keys: _Keys, b_hi: int, need: int, picked: list[list[torch.Tensor]]) -> None:
    """Heavy ties (too many candidates to buffer): a low-bits histogram pass, then a compaction pass."""
    lo_hist = torch.zeros(N_LO, dtype=torch.int64, device=keys.device)
    for pos in range(len(keys)):
        for _, k in keys.of(pos):
            lo_hist += torch.bincount(k[(k >> HI_SHIFT) == b_hi] & (N_LO - 1), minlength=N_LO)
    b_lo, above_lo = threshold_bin(lo_hist, need)
    threshold = (b_hi << HI_SHIFT) | b_lo
    ties_left = need - above_lo
    for pos in range(len(keys)):
        for start, k in keys.of(pos):
            picked[pos].append(torch.nonzero(k > threshold).reshape(-1) + start)
            if ties_left:
                ties = torch.nonzero(k == threshold).reshape(-1)[:ties_left]
                ties_left -= ties.numel()
                picked[pos].append(ties + start)


def _sorted_outputs(picked: list[list[torch.Tensor]], weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for pos, w in enumerate(weights):
        idx = torch.cat(picked[pos]) if picked[pos] else torch.empty(0, dtype=torch.int64, device=w.device)
        out.append(torch.sort(idx).values.to(index_dtype(w.numel())))
    return out


def select_topk(
    grads: Sequence[torch.Tensor | None],
    weights: Sequence[torch.Tensor],
    k: int,
    *,
    scorer: str = "gallop",
    eps: float = 1e-8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Exact global top-k by radix select on the key bits; see ``gallop_kernels.select_topk`` for the contract."""
    keys = _Keys(grads, weights, scorer, eps, seed)
    hist = _level1_histogram(keys)
    b_hi, above_hi = threshold_bin(hist, k)
    need = k - above_hi  # elements still to take from bin b_hi
    picked: list[list[torch.Tensor]] = [[] for _ in weights]
    if int(hist[b_hi].item()) <= CANDIDATE_CAP:
        _resolve_candidates(_collect_candidates(keys, b_hi, picked), need, picked)
    else:
        _resolve_by_passes(keys, b_hi, need, picked)
    return _sorted_outputs(picked, weights)
