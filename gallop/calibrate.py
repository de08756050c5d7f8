"""Phase 1a: the mean signed task gradient of every eligible weight over calibration data.

``mean_gradients`` runs one backward pass per batch. Only the eligible weights require grad, each with a
post-accumulate-grad hook that folds its dense ``.grad`` into an accumulator and frees it at once, so at most one
layer's dense gradient exists at a time. The accumulators are fp32 on the weight's device (default), bf16 with
stochastic rounding (half the memory), or fp32 in host memory (``accumulate="cpu"``: none on the device).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gallop_kernels

from .checkpointing import eval_but_keep_checkpointing, inputs_require_grad
from .config import GallopConfig
from .quantized import calibration_forwards, shape_of
from .selection import eligible_parameters, quantized_owners

LossFn = Callable[[nn.Module, Any], torch.Tensor]
REDUCTIONS = ("example", "batch")
ACCUMULATE = ("fp32", "bf16", "cpu")


@dataclass
class CalibrationArguments:
    """How ``mean_gradients`` reduces and accumulates (the command line's ``--calib_reduction``, ``--accumulate``)."""

    calib_reduction: str = field(
        default="example",
        metadata={
            "help": "example: mean of per-example gradients (the paper); batch: mean of batch losses' gradients",
            "choices": list(REDUCTIONS),
        },
    )
    accumulate: str = field(default="fp32", metadata={"help": "calibration accumulators", "choices": list(ACCUMULATE)})


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch).loss`` (a Hugging Face causal LM with ``labels`` in the batch): one scalar per batch."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no .loss: put 'labels' in the batch or pass loss_fn=")
    return loss


def per_example_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean token cross-entropy over its labelled (``!= -100``) tokens, shape ``[batch]``.

    For a causal LM batch with ``input_ids``, ``labels`` (and optionally ``attention_mask`` and other inputs): the
    logits at position ``t`` predict the label at ``t + 1``, as the Hugging Face loss does.
    """
    if "labels" not in batch:
        raise ValueError("the batch has no 'labels': per-example calibration needs them (or pass loss_fn=)")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]
    target = labels[:, 1:]
    ce = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = target != -100
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        raise ValueError(
            f"calibration example {int(torch.nonzero(counts == 0)[0])} of a batch has no answer tokens "
            f"(all its labels are -100): drop it or fix the labels"
        )
    return (ce * mask).sum(1) / counts


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def calibration_subset(n: int, fraction: float, seed: int = 0) -> list[int]:
    """The paper's calibration sample: ``ceil(fraction * n)`` distinct indices into a training set of ``n``
    examples, chosen at random from ``seed`` (sorted, so the data order is kept)."""
    n = gallop_kernels.check_int("n", n, low=1, what="the training set's size")
    fraction = gallop_kernels.check_real("fraction (d_s)", fraction, low=0.0, low_open=True, high=1.0)
    size = max(1, math.ceil(fraction * n))
    return sorted(random.Random(seed).sample(range(n), size))


# ------------------------------------------------------------------------------------------------ accumulators
class _Accumulator:
    """Sums the dense gradients of one weight, in the chosen precision and place."""

    def __init__(self, p: torch.Tensor, mode: str, generator: torch.Generator | None) -> None:
        self.mode = mode
        self.generator = generator
        if mode == "fp32":
            self.buf = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        elif mode == "bf16":
            self.buf = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
        else:
            pin = p.device.type == "cuda"
            self.buf = torch.zeros(p.shape, dtype=torch.float32, device="cpu", pin_memory=pin)

    def add(self, grad: torch.Tensor) -> None:
        if self.mode == "fp32":
            self.buf.add_(grad)
        elif self.mode == "bf16":
            self.buf.copy_(_stochastic_bf16(self.buf.float().add_(grad), self.generator))
        else:
            self.buf.add_(grad.to("cpu", torch.float32))

    def mean(self, count: int, device: torch.device) -> torch.Tensor:
        return self.buf.to(device, torch.float32).div_(count) if self.mode != "fp32" else self.buf.div_(count)


def _stochastic_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """fp32 -> bf16 with stochastic rounding: unbiased, so a long sum of small gradients does not stall."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = x.view(torch.int32).add_(noise).bitwise_and_(~0xFFFF)
    return bits.view(torch.float32).to(torch.bfloat16)


@contextlib.contextmanager
def only_these_require_grad(
    model: nn.Module, params: Mapping[str, torch.Tensor], on_grad: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """Inside: only ``params`` require grad, each with a post-accumulate-grad hook calling ``on_grad(name, grad)``
    and freeing the grad; the model in eval mode (but its checkpointing layers, see ``gallop.checkpointing``).
    On exit (also on error): every ``requires_grad`` flag, ``.grad`` and hook as before, and every module's mode."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    handles = []

    def make_hook(name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                on_grad(name, p.grad)
            p.grad = None

        return hook

    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
            p.grad = None
        for name, weight in params.items():
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(make_hook(name)))
        eval_but_keep_checkpointing(model)
        embeddings_hook = inputs_require_grad(model)
        if embeddings_hook is not None:
            handles.append(embeddings_hook)
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes:
            m.training = mode


def _check_args(batches: Any, max_batches: Any, reduction: str, accumulate: str) -> int | None:
    """Validate mean_gradients' arguments; returns ``max_batches`` as a Python int (or None)."""
    if isinstance(batches, (Mapping, torch.Tensor)):
        raise TypeError(
            f"batches must be an iterable of batches (a DataLoader, a list of dicts), got one "
            f"{type(batches).__name__}; to calibrate on a single batch pass [batch]"
        )
    if max_batches is not None:
        max_batches = gallop_kernels.check_int("max_batches", max_batches, low=1, what="a positive int or None")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {', '.join(ACCUMULATE)}, got {accumulate!r}")
    return max_batches


def mean_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    config: GallopConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    group: Any = None,
    reduction: str = "example",
    accumulate: str = "fp32",
    seed: int = 0,
) -> OrderedDict[str, torch.Tensor]:
    """The mean signed gradient of the loss over the calibration data, for every eligible weight.

    ``reduction="example"`` (default, the paper): ``g = (1/N) sum_n grad L_n``, the mean over the ``N`` examples of
    each example's gradient, where ``L_n`` is its mean token loss (``per_example_loss``): every example weighs the
    same however many answer tokens it has. ``reduction="batch"`` (gallop 0.1): the mean over batches of each
    batch's ``model(**batch).loss``, i.e. token-weighted within a batch. Both cost one backward pass per batch.

    Each eligible weight's dense ``.grad`` is folded into its accumulator by a post-accumulate-grad hook and freed at
    once, and weights that are not eligible get no gradient. Peak memory: the weights, the accumulators, one
    layer's dense gradient and the activations. The model's ``requires_grad`` flags, training mode and ``.grad``
    fields are restored afterwards, and its weights are not touched. Dropout is off (eval mode), so the result is a
    deterministic function of the data; a model with gradient checkpointing enabled keeps checkpointing (and its
    memory savings) during calibration.

    Args:
        model: the model; batches are moved to the device of its first parameter.
        batches: an iterable of batches (dicts for Hugging Face models).
        config: selects the eligible weights (default GallopConfig()).
        loss_fn: ``loss_fn(model, batch)``: per-example losses ``[B]`` for ``reduction="example"`` (default
            ``per_example_loss``), one scalar for ``"batch"`` (default ``model(**batch).loss``).
        max_batches: use at most this many batches.
        progress: show a progress bar.
        group: under torch.distributed (initialized), the process group to average over (default: the world).
            Each rank passes its own shard of the data; the sums and counts are all-reduced, so every rank gets the
            mean over all ranks' data and ``select`` picks the identical set on every rank.
        reduction: ``"example"`` or ``"batch"``, above.
        accumulate: ``"fp32"`` (4 bytes per eligible weight on the device), ``"bf16"`` (2 bytes: bf16 sums with
            stochastic rounding from ``seed``, unbiased), or ``"cpu"`` (fp32 in host memory, pinned on CUDA: no
            accumulator on the device; each layer's gradient is copied to the host as backward produces it).
        seed: seeds the stochastic rounding of ``accumulate="bf16"``.

    Returns:
        parameter name -> fp32 mean gradient (same shape and device as the weight).
    """
    from .progress import progress_bar

    config = config or GallopConfig()
    max_batches = _check_args(batches, max_batches, reduction, accumulate)
    loss_fn = loss_fn or (per_example_loss if reduction == "example" else default_loss)
    eligible = eligible_parameters(model, config)
    device = next(model.parameters()).device
    generator = None
    if accumulate == "bf16":
        generator = torch.Generator(device=device).manual_seed(seed)
    # a quantized layer's gradient is w.r.t. its de-quantized weight, from its backward (nothing requires grad)
    owners = quantized_owners(model)
    layers_q = OrderedDict((n, owners[id(p)]) for n, p in eligible.items() if id(p) in owners)
    dense = OrderedDict((n, p) for n, p in eligible.items() if n not in layers_q)
    shaped = {
        n: torch.empty((), device=p.device).expand(shape_of(layers_q[n])) for n, p in eligible.items() if n in layers_q
    }
    acc = OrderedDict((n, _Accumulator(shaped.get(n, p), accumulate, generator)) for n, p in eligible.items())

    count = n_batches = 0
    on_grad = lambda name, grad: acc[name].add(grad)  # noqa: E731
    with only_these_require_grad(model, dense, on_grad), calibration_forwards(layers_q, on_grad):
        bar = progress_bar(batches, total=max_batches, desc="calibration gradients", disable=not progress, unit="batch")
        for batch in bar:
            if max_batches is not None and n_batches >= max_batches:
                break
            loss = loss_fn(model, to_device(batch, device))
            if reduction == "example":
                if loss.dim() != 1:
                    raise ValueError(
                        f"with reduction='example', loss_fn must return one loss per example (shape "
                        f"[batch]), got shape {tuple(loss.shape)}"
                    )
                count += loss.numel()
                loss = loss.sum()
            else:
                count += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ValueError(
                    f"the loss of calibration batch {n_batches} is {value}: check the batch (labels all "
                    f"-100?) and the model's dtype"
                )
            loss.backward()
            n_batches += 1
            bar.set_postfix(loss=f"{value:.4f}")
    count = _all_reduce_sums(acc, count, group)
    if count == 0:
        raise ValueError("batches is empty: mean_gradients needs at least one calibration batch")
    return OrderedDict((n, a.mean(count, eligible[n].device)) for n, a in acc.items())


def _all_reduce_sums(acc: OrderedDict[str, _Accumulator], count: int, group: Any) -> int:
    """Sum the accumulators and the count over the ranks of ``group`` (a no-op outside torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return count
    first = next(iter(acc.values())).buf
    n = torch.tensor([count], dtype=torch.float64, device=first.device)
    dist.all_reduce(n, group=group)
    for a in acc.values():
        if a.mode == "bf16":  # sum in fp32 across ranks, then round once
            total = a.buf.float()
            dist.all_reduce(total, group=group)
            a.buf.copy_(total)
        else:
            dist.all_reduce(a.buf, group=group)
    return int(n.item())
