"""Facts every op and backend shares: the scorers, the score keys, the index dtype, the random scorer's hash.

Selection works on 32-bit *keys*, one per element, where a larger key means "selected first":

* ``gallop``    key = bits(|g| / (|w| + eps))           (fp32 math, IEEE division)
* ``gradient``  key = bits(|g|)
* ``product``   key = bits(|g * w|)
* ``magnitude`` key = 0x7F7FFFFF - bits(|w|)             (smallest |w| first)
* ``random``    key = hash32(seed, tensor position, flat index) >> 2

``bits`` reinterprets a non-negative fp32 as int32, which preserves its order. A finite score maps to a key in
[0, MAX_KEY]; a NaN or Inf score maps outside it, so the first histogram pass of either backend detects it for
free (bins above the one holding MAX_KEY).
"""

from __future__ import annotations

import torch

#: scorer name -> whether it reads gradients. The one list of scorers (``gallop.GallopConfig`` uses it too).
SCORERS: dict[str, bool] = {"gallop": True, "gradient": True, "magnitude": False, "product": True, "random": False}
#: the scorer ids the Triton kernels branch on (their ``SCORER`` constexpr)
SCORER_IDS: dict[str, int] = {name: i for i, name in enumerate(SCORERS)}

MAX_KEY = 0x7F7FFFFF  # bits of the largest finite fp32
INT32_LIMIT = 2**31  # tensors with this many elements or more get int64 indices

_M32 = 0xFFFFFFFF
MIX1 = 0x7FEB352D  # the random scorer's 32-bit finalizer constants (the Triton kernel repeats them as literals)
MIX2 = 0x846CA68B


def index_dtype(numel: int) -> torch.dtype:
    """The dtype of flat indices into a tensor of ``numel`` elements: int32 below 2**31 elements, else int64."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def nonfinite_score_error(scorer: str, position: int) -> ValueError:
    """The error both selection backends raise when a score is NaN or Inf."""
    return ValueError(
        f"the {scorer!r} scores of tensor {position} contain NaN or Inf: check grads[{position}] and "
        f"weights[{position}] for non-finite values (or overflow of |g|/(|w|+eps): raise eps)"
    )


def threshold_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(the bin holding the k-th largest key, how many keys lie in higher bins) of a histogram over keys."""
    desc = hist.flip(0).cumsum(0)
    pos = int(torch.searchsorted(desc, torch.tensor([k], dtype=desc.dtype, device=desc.device)).item())
    b = hist.numel() - 1 - pos
    above = int(desc[pos].item()) - int(hist[b].item())
    return b, above


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * MIX1) & _M32
    x ^= x >> 15
    x = (x * MIX2) & _M32
    return x ^ (x >> 16)


def random_seed_key(seed: int, position: int) -> int:
    """The per-tensor part of the ``random`` scorer's hash: ``mix32(mix32(seed) ^ position)``."""
    return _mix32_int(_mix32_int(seed & _M32) ^ (position & _M32))
