"""Phase 1a: the mean signed task gradient of every eligible weight over calibration batches."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import GallopConfig
from .selection import eligible_parameters

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch).loss`` (a Hugging Face causal LM with ``labels`` in the batch)."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no .loss: put 'labels' in the batch or pass loss_fn=")
    return loss


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def mean_gradients(model: nn.Module, batches: Iterable[Any], config: Optional[GallopConfig] = None, *,
                   loss_fn: Optional[LossFn] = None, max_batches: Optional[int] = None,
                   progress: bool = True, group: Any = None) -> "OrderedDict[str, torch.Tensor]":
    """Mean signed gradient of the loss over ``batches``, for every eligible weight.

    ``g = (1/B) * sum_b grad loss_fn(model, batch_b)`` (the mean over batches of each batch's loss gradient),
    accumulated in fp32. Each weight's dense ``.grad`` is folded into its accumulator by a
    post-accumulate-grad hook and freed at once, and weights that are not eligible get no gradient, so the
    peak memory is the weights + one fp32 copy of the eligible weights + activations. The model's
    ``requires_grad`` flags, training mode and ``.grad`` fields are restored afterwards; its weights are not
    touched. Dropout is off (eval mode) so the gradient is a deterministic function of the batches.

    Args:
        model: the model; batches are moved to the device of its first parameter.
        batches: an iterable of batches (dicts for Hugging Face models).
        config: selects the eligible weights (default GallopConfig()).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default ``model(**batch).loss``.
        max_batches: use at most this many batches.
        progress: show a tqdm progress bar.
        group: under torch.distributed (initialized), the process group to average over (default: the world).
            Each rank passes its own shard of the batches; the sums and batch counts are all-reduced, so every rank
            gets the mean over all ranks' batches and ``select`` picks the identical set on every rank.

    Returns:
        parameter name -> fp32 mean gradient (same shape and device as the weight).
    """
    config = config or GallopConfig()
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    loss_fn = loss_fn or default_loss
    eligible = eligible_parameters(model, config)
    device = next(model.parameters()).device
    acc = OrderedDict((n, torch.zeros(p.shape, dtype=torch.float32, device=p.device)) for n, p in eligible.items())

    saved_flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    handles = []

    def make_hook(buf: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            buf.add_(p.grad)
            p.grad = None
        return hook

    n_batches = 0
    try:
        for p, _, _ in saved_flags:
            p.requires_grad_(False)
            p.grad = None
        for name, p in eligible.items():
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(make_hook(acc[name])))
        model.eval()
        bar = tqdm(batches, total=max_batches, desc="calibration gradients", disable=not progress, unit="batch")
        for batch in bar:
            if max_batches is not None and n_batches >= max_batches:
                break
            loss = loss_fn(model, to_device(batch, device))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ValueError(f"the loss of calibration batch {n_batches} is {value}: check the batch "
                                 f"(labels all -100?) and the model's dtype")
            loss.backward()
            n_batches += 1
            bar.set_postfix(loss=f"{value:.4f}")
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in saved_flags:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    n_batches = _all_reduce_sums(acc, n_batches, group)
    if n_batches == 0:
        raise ValueError("batches is empty: mean_gradients needs at least one calibration batch")
    for buf in acc.values():
        buf.div_(n_batches)
    return acc


def _all_reduce_sums(acc: "OrderedDict[str, torch.Tensor]", count: int, group: Any) -> int:
    """Sum the accumulators and the count over the ranks of ``group`` (a no-op outside torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return count
    device = next(iter(acc.values())).device
    n = torch.tensor([count], dtype=torch.float64, device=device)
    dist.all_reduce(n, group=group)
    for buf in acc.values():
        dist.all_reduce(buf, group=group)
    return int(n.item())
