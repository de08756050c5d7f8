"""select_topk: exact global top-k over many tensors by score, fused with scoring, never materializing scores.

``reference.py``: two-level radix select with ``torch.bincount`` (the CPU path and the oracle).
``triton.py``: fused scoring + 2048-bin histograms + candidate buffering + ordered compaction.
This module checks the arguments. Selection runs once per fine-tuning job, outside compiled regions, and its
output sizes depend on the data, so it is not a torch.library op.
"""

from __future__ import annotations

import torch

from .._common import SCORERS
from .._validate import check_float, check_same_device, integer, real


def check_select_topk_args(grads, weights, k, scorer: str, eps, seed) -> tuple[list, list, int, float, int]:
    """Validate ``select_topk``'s arguments; returns (grads with None entries, weights, k, eps, seed)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}; got {scorer!r}")
    needs_grads = SCORERS[scorer]
    if isinstance(weights, torch.Tensor):
        raise TypeError("weights must be a sequence of tensors (a list), not a single tensor; wrap it: [w]")
    weights = list(weights)
    if not weights:
        raise ValueError("weights is empty: pass at least one tensor to select from")
    if grads is None:
        if needs_grads:
            raise ValueError(
                f"grads is None but scorer {scorer!r} needs gradients; pass grads or use scorer='magnitude' or 'random'"
            )
        grads = [None] * len(weights)
    else:
        if isinstance(grads, torch.Tensor):
            raise TypeError("grads must be a sequence of tensors (a list), not a single tensor; wrap it: [g]")
        grads = list(grads)
        if len(grads) != len(weights):
            raise ValueError(f"grads has {len(grads)} tensors but weights has {len(weights)}; pass one grad per weight")
    for i, w in enumerate(weights):
        check_float(w, f"weights[{i}]")
    for i, (g, w) in enumerate(zip(grads, weights)):
        if g is None:
            if needs_grads:
                raise ValueError(f"grads[{i}] is None but scorer {scorer!r} needs gradients")
            continue
        check_float(g, f"grads[{i}]")
        if g.shape != w.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but weights[{i}] has shape {tuple(w.shape)}")
    check_same_device(
        [(f"weights[{i}]", w) for i, w in enumerate(weights)] + [(f"grads[{i}]", g) for i, g in enumerate(grads)]
    )
    total = sum(w.numel() for w in weights)
    k = integer("k", k)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (the total number of elements), got {k}")
    return grads, weights, k, real("eps", eps, low=0.0), integer("seed", seed)
