"""Pure-PyTorch implementations of every gallop_kernels op: the CPU path and the oracle for the Triton kernels.

Inputs are assumed validated (see ``_checks.py``); call the public functions in ``gallop_kernels`` instead.

Selection works on 32-bit *keys*, one per element, where a larger key means "selected first":

* ``gallop``    key = bits(|g| / (|w| + eps))           (fp32 math, IEEE division)
* ``gradient``  key = bits(|g|)
* ``product``   key = bits(|g * w|)
* ``magnitude`` key = 0x7F7FFFFF - bits(|w|)             (smallest |w| first)
* ``random``    key = hash32(seed, tensor position, flat index) >> 2

``bits`` reinterprets a non-negative fp32 as int32, which preserves its order. A finite score maps to a key in
[0, 0x7F7FFFFF]; a NaN or Inf score maps outside it, which the first histogram pass detects for free (bins at
0xFF00 and above). The exact k-th largest key is found by a two-level radix select (16 high bits, then 15 low
bits) over histograms built chunk by chunk, so no score tensor larger than one chunk ever exists.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

MAX_KEY = 0x7F7FFFFF  # bits of the largest finite fp32
HI_SHIFT = 15  # the first pass resolves key >> 15 (16 bits), the second the low 15 bits
N_HI = 1 << 16
N_LO = 1 << HI_SHIFT
INVALID_HI_BIN = MAX_KEY >> HI_SHIFT  # 0xFEFF: bins above it only hold non-finite scores
CHUNK = 1 << 20  # elements scored at once: bounds the extra memory of the reference path
CANDIDATE_CAP = 1 << 22  # candidates buffered in memory (12 bytes each) before falling back to a third pass
_INT32_LIMIT = 2**31  # tensors with this many elements or more get int64 indices (tests lower it)

_M32 = 0xFFFFFFFF
_MIX1 = 0x7FEB352D
_MIX2 = 0x846CA68B


# --------------------------------------------------------------------------------------------------- hashing
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """Low 32 bits of x * c for int64 x in [0, 2**32), without overflowing int64."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xorshift-multiply), on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * _MIX1) & _M32
    x ^= x >> 15
    x = (x * _MIX2) & _M32
    return x ^ (x >> 16)


def random_seed_key(seed: int, position: int) -> int:
    """The per-tensor part of the ``random`` scorer's hash: ``mix32(mix32(seed) ^ position)``."""
    return _mix32_int(_mix32_int(seed & _M32) ^ (position & _M32))


def random_keys(seed: int, position: int, flat_index: torch.Tensor) -> torch.Tensor:
    """``random`` scorer keys: ``mix32(mix32(tensor_key ^ index_hi) ^ index_lo) >> 2`` as int32 in [0, 2**30)."""
    tkey = random_seed_key(seed, position)
    h = _mix32((flat_index >> 32) ^ tkey)
    h = _mix32(h ^ (flat_index & _M32))
    return (h >> 2).to(torch.int32)


# ---------------------------------------------------------------------------------------------------- scores
def score_keys(g: Optional[torch.Tensor], w: torch.Tensor, scorer: str, eps: float, seed: int, position: int,
               start: int, buffers: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Int32 keys of the flat chunk ``w`` (and ``g``), whose first element has flat index ``start``.

    ``buffers``: two fp32 scratch tensors of at least ``w.numel()`` elements, reused across chunks so the hot
    loop allocates nothing (the keys are returned as a view of the first one).
    """
    n = w.numel()
    if scorer == "random":
        idx = torch.arange(start, start + n, dtype=torch.int64, device=w.device)
        return random_keys(seed, position, idx)
    if buffers is None:
        buffers = (torch.empty(n, dtype=torch.float32, device=w.device),
                   torch.empty(n, dtype=torch.float32, device=w.device))
    s, tmp = buffers[0][:n], buffers[1][:n]
    if scorer == "magnitude":
        torch.abs(w, out=s) if w.dtype == torch.float32 else s.copy_(w).abs_()
        keys = s.view(torch.int32)
        return torch.sub(MAX_KEY, keys, out=keys)
    torch.abs(g, out=s) if g.dtype == torch.float32 else s.copy_(g).abs_()  # never writes the caller's grad
    if scorer == "gallop":
        torch.abs(w, out=tmp) if w.dtype == torch.float32 else tmp.copy_(w).abs_()
        s.div_(tmp.add_(eps))
    elif scorer == "product":
        s.mul_(w).abs_()
    return s.view(torch.int32)


def scores(g: Optional[torch.Tensor], w: torch.Tensor, scorer: str, eps: float = 1e-8, seed: int = 0,
           position: int = 0) -> torch.Tensor:
    """The fp32 score of every element of one tensor (for tests and small inputs; selection never calls it).

    For ``magnitude`` this is ``-|w|`` and for ``random`` the hash as a float, so larger is always better.
    """
    keys = score_keys(None if g is None else g.reshape(-1), w.reshape(-1), scorer, eps, seed, position, 0)
    if scorer == "magnitude":
        return -(MAX_KEY - keys).view(torch.float32).reshape(w.shape)
    if scorer == "random":
        return keys.to(torch.float64).reshape(w.shape)
    return keys.view(torch.float32).reshape(w.shape)


def _chunks(g: Optional[torch.Tensor], w: torch.Tensor):
    gf = None if g is None else g.reshape(-1)
    wf = w.reshape(-1)
    n = wf.numel()
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        yield start, (None if gf is None else gf[start:end]), wf[start:end]


def _threshold_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Return (bin holding the k-th largest, number of elements in higher bins) for a histogram."""
    desc = hist.flip(0).cumsum(0)
    pos = int(torch.searchsorted(desc, torch.tensor([k], dtype=desc.dtype, device=desc.device)).item())
    b = hist.numel() - 1 - pos
    above = int(desc[pos].item()) - int(hist[b].item())
    return b, above


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < _INT32_LIMIT else torch.int64


def select_topk(grads: Sequence[Optional[torch.Tensor]], weights: Sequence[torch.Tensor], k: int, *,
                scorer: str = "gallop", eps: float = 1e-8, seed: int = 0) -> list[torch.Tensor]:
    """Exact global top-k by radix select on the key bits; see ``gallop_kernels.select_topk`` for the contract."""
    device = weights[0].device
    width = min(CHUNK, max(w.numel() for w in weights))
    buffers = (torch.empty(width, dtype=torch.float32, device=device),
               torch.empty(width, dtype=torch.float32, device=device))
    shifted = torch.empty(width, dtype=torch.int32, device=device)

    def chunk_keys(pos, g, w):
        for start, gc, wc in _chunks(g, w):
            yield start, score_keys(gc, wc, scorer, eps, seed, pos, start, buffers)

    # Pass 1: histogram of the 16 high key bits over all tensors.
    hist = torch.zeros(N_HI, dtype=torch.int64, device=device)
    for pos, (g, w) in enumerate(zip(grads, weights)):
        local = torch.zeros(N_HI, dtype=torch.int64, device=device)
        for start, keys in chunk_keys(pos, g, w):
            hi = torch.bitwise_right_shift(keys, HI_SHIFT, out=shifted[: keys.numel()])
            if scorer == "magnitude":  # a non-finite |w| gives a negative key: fold it into the invalid bins
                hi.bitwise_and_(0xFFFF)
            local += torch.bincount(hi, minlength=N_HI)
        if int(local[INVALID_HI_BIN + 1:].sum().item()):
            raise ValueError(
                f"the {scorer!r} scores of tensor {pos} contain NaN or Inf: check grads[{pos}] and weights[{pos}] "
                f"for non-finite values (or overflow of |g|/(|w|+eps): raise eps)")
        hist += local
    b_hi, above_hi = _threshold_bin(hist, k)
    need = k - above_hi  # elements still to take from bin b_hi
    n_cand = int(hist[b_hi].item())
    bin_lo, bin_end = b_hi << HI_SHIFT, (b_hi + 1) << HI_SHIFT  # bin b_hi holds keys in [bin_lo, bin_end)

    picked: list[list[torch.Tensor]] = [[] for _ in weights]
    if n_cand <= CANDIDATE_CAP:
        # Pass 2: collect everything above bin b_hi, buffer the candidates inside it.
        cand_pos, cand_idx, cand_lo = [], [], []
        for pos, (g, w) in enumerate(zip(grads, weights)):
            for start, keys in chunk_keys(pos, g, w):
                hits = torch.nonzero(keys >= bin_lo).reshape(-1)  # ~k/N of the chunk: cheap to split further
                hit_keys = keys[hits]
                above = hit_keys >= bin_end
                picked[pos].append(hits[above] + start)
                in_bin = ~above
                if bool(in_bin.any()):
                    cand_idx.append(hits[in_bin] + start)
                    cand_lo.append(hit_keys[in_bin] & (N_LO - 1))
                    cand_pos.append(torch.full((cand_idx[-1].numel(),), pos, dtype=torch.int64, device=device))
        c_idx, c_lo, c_pos = torch.cat(cand_idx), torch.cat(cand_lo), torch.cat(cand_pos)
        b_lo, above_lo = _threshold_bin(torch.bincount(c_lo, minlength=N_LO), need)
        take = c_lo > b_lo
        ties = torch.nonzero(c_lo == b_lo).reshape(-1)[: need - above_lo]  # in (tensor, index) order
        take[ties] = True
        for pos in torch.unique(c_pos[take]).tolist():
            picked[pos].append(c_idx[take & (c_pos == pos)])
    else:
        # Too many candidates to buffer (heavy ties): a histogram pass on the low bits, then a compaction pass.
        lo_hist = torch.zeros(N_LO, dtype=torch.int64, device=device)
        for pos, (g, w) in enumerate(zip(grads, weights)):
            for start, keys in chunk_keys(pos, g, w):
                lo_hist += torch.bincount(keys[(keys >> HI_SHIFT) == b_hi] & (N_LO - 1), minlength=N_LO)
        b_lo, above_lo = _threshold_bin(lo_hist, need)
        threshold = (b_hi << HI_SHIFT) | b_lo
        ties_left = need - above_lo
        for pos, (g, w) in enumerate(zip(grads, weights)):
            for start, keys in chunk_keys(pos, g, w):
                picked[pos].append(torch.nonzero(keys > threshold).reshape(-1) + start)
                if ties_left:
                    ties = torch.nonzero(keys == threshold).reshape(-1)[:ties_left]
                    ties_left -= ties.numel()
                    picked[pos].append(ties + start)

    out = []
    for pos, w in enumerate(weights):
        idx = torch.cat(picked[pos]) if picked[pos] else torch.empty(0, dtype=torch.int64, device=device)
        out.append(torch.sort(idx).values.to(_index_dtype(w.numel())))
    return out


# ------------------------------------------------------------------------------------------------- optimizer
def sparse_adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 0.0) -> None:
    """torch.optim.AdamW's single-tensor math (amsgrad=False, maximize=False), in place."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / (bias_correction2**0.5)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def gather(src: torch.Tensor, indices: torch.Tensor, *, out: Optional[torch.Tensor] = None,
           accumulate: bool = False) -> torch.Tensor:
    """fp32 ``src.reshape(-1)[indices]``, written into (or, with accumulate, added to) ``out``."""
    vals = src.reshape(-1).index_select(0, indices).to(torch.float32)
    if out is None:
        return vals
    if accumulate:
        out.add_(vals)
    else:
        out.copy_(vals)
    return out


def scatter_(dst: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, *,
             base: Optional[torch.Tensor] = None) -> None:
    """``dst.view(-1)[indices] = cast(base + values)`` (fp32 sum, one rounding), or ``cast(values)``."""
    vals = values if base is None else base.to(torch.float32) + values
    dst.view(-1).index_copy_(0, indices.to(torch.int64), vals.to(dst.dtype))


def weight_grad_at(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """fp32 ``(grad_output_2d^T @ input_2d).view(-1)[indices]``: the dense weight gradient, then a gather.

    The product runs in the inputs' dtype (as torch's own linear backward does), so on bf16 activations it rounds
    like the stock weight gradient before the gather.
    """
    g = grad_output.reshape(-1, grad_output.shape[-1])
    x = input.reshape(-1, input.shape[-1])
    dense = g.t().matmul(x)
    return dense.reshape(-1).index_select(0, indices).to(torch.float32)


def sparse_adamw_step_(weight: torch.Tensor, weight_grad: torch.Tensor, indices: torch.Tensor,
                       base: torch.Tensor, delta: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                       *, step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                       weight_decay: float = 0.0) -> None:
    """Gather ``weight_grad`` at ``indices``, AdamW-update ``delta``, write ``cast(base + delta)`` into ``weight``."""
    grad = gather(weight_grad, indices)
    sparse_adamw_(delta, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay)
    scatter_(weight, indices, delta, base=base)
