"""Phase 1a: the mean signed task gradient of every eligible weight over calibration data.

``mean_gradients`` runs one backward pass per batch. Only the eligible weights require grad, each with a
post-accumulate-grad hook that folds its dense ``.grad`` into an accumulator and frees it at once, so at most one
layer's dense gradient exists at a time. The accumulators are fp32 on the weight's device (default), bf16 with
stochastic rounding (half the memory), or fp32 in host memory (``accumulate="cpu"``: none on the device).

``slices=S`` bounds the accumulators to about 1/S: each of up to S passes over the data accumulates one slice of
the eligible weights, and an exact running top-k of the score (``selection.top_candidates``) carries what the
selection can still pick from one slice to the next.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

import gallop_kernels

from .checkpointing import eval_but_keep_checkpointing, inputs_require_grad
from .config import GallopConfig
from .quantized import calibration_forwards
from .selection import (
    GradientCandidates,
    eligible_parameters,
    offer,
    quantized_owners,
    selection_size,
    top_candidates,
    weight_shape,
)

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
    calib_slices: int = field(
        default=1,
        metadata={
            "help": "passes over the calibration data, each accumulating 1/S of the eligible weights: about 1/S of "
            "the accumulator memory for S times the calibration compute, and the identical selection"
        },
    )


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
    """Sums the dense gradients of one weight (of ``shape``, on ``device``: a quantized layer's stand for its
    de-quantized ``[out, in]`` weight), in the chosen precision and place."""

    def __init__(
        self, shape: tuple[int, ...], device: torch.device, mode: str, generator: torch.Generator | None
    ) -> None:
        self.mode = mode
        self.generator = generator
        if mode == "fp32":
            self.buf = torch.zeros(shape, dtype=torch.float32, device=device)
        elif mode == "bf16":
            self.buf = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        else:
            pin = device.type == "cuda"
            self.buf = torch.zeros(shape, dtype=torch.float32, device="cpu", pin_memory=pin)

    def add(self, grad: torch.Tensor) -> None:
        if self.mode == "fp32":
            self.buf.add_(grad)
        elif self.mode == "bf16":
            self.buf.copy_(_stochastic_bf16(self.buf.float().add_(grad), self.generator))
        else:
            self.buf.add_(grad.to("cpu", torch.float32))

    def mean(self, count: int, device: torch.device) -> torch.Tensor:
        return self.buf.to(device, torch.float32).div_(count) if self.mode != "fp32" else self.buf.div_(count)


def _rounding_generator(mode: str, device: torch.device, seed: int, position: int) -> torch.Generator | None:
    """The stochastic rounding stream of the eligible weight at ``position`` (bf16 accumulators only): one per
    weight, so its sums do not depend on which other weights accumulate in the same pass."""
    if mode != "bf16":
        return None
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + position)


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


def _check_args(batches: Any, max_batches: Any, reduction: str, accumulate: str, slices: Any) -> tuple[int | None, int]:
    """Validate mean_gradients' arguments; returns ``max_batches`` (or None) and ``slices`` as Python ints."""
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
    slices = gallop_kernels.check_int("slices", slices, low=1, what="a positive int (1: one pass)")
    if slices > 1 and iter(batches) is batches:
        raise TypeError(
            f"batches is a one-shot iterator ({type(batches).__name__}), but slices={slices} reads it once per "
            f"slice: pass a list of batches or a DataLoader (one that yields the same batches every time)"
        )
    return max_batches, slices


@overload
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
    slices: Literal[1] = 1,
) -> OrderedDict[str, torch.Tensor]: ...


@overload
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
    slices: int,
) -> OrderedDict[str, torch.Tensor] | GradientCandidates: ...


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
    slices: int = 1,
) -> OrderedDict[str, torch.Tensor] | GradientCandidates:
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
        seed: seeds the stochastic rounding of ``accumulate="bf16"`` (one stream per eligible weight, from ``seed``
            and its position, so the sums are the same whatever ``slices`` is).
        slices: ``S > 1`` calibrates in slices: the eligible weights are cut, in their order, into at most ``S``
            contiguous groups whose largest holds as few entries as possible (fewer groups when more would not
            make it smaller, so ``S`` above the number of eligible weights means at most one weight per pass).
            Each group takes one full pass over ``batches`` (so ``batches`` must yield the same batches every
            time it is iterated: a one-shot iterator is refused, and a pass whose batches differ from the first
            pass's raises), with only its weights requiring grad and its sums all-reduced under ``group``; then
            an exact running top-k keeps the entries ``config``'s selection can still pick (the top k over the
            groups so far, or with ``per_tensor`` each weight's own top). The accumulators of one group (at the
            merge: its fp32 mean gradients) and the candidates (8 bytes each; 12 plus the weight's bytes per
            candidate while a merge runs) are all that is held, for ``S`` times the calibration compute. Needs a
            scorer that reads gradients.

    Returns:
        ``slices=1``: parameter name -> fp32 mean gradient (same shape and device as the weight). ``slices > 1``:
        ``GradientCandidates``, from which ``select(model, candidates, config)`` makes exactly the selection it
        makes from the dense mean gradients (and the same fp32 values at the candidates as ``slices=1``).
    """
    config = config or GallopConfig()
    max_batches, slices = _check_args(batches, max_batches, reduction, accumulate, slices)
    loss_fn = loss_fn or (per_example_loss if reduction == "example" else default_loss)
    eligible = eligible_parameters(model, config)
    device = next(model.parameters()).device
    positions = {n: i for i, n in enumerate(eligible)}
    # a quantized layer's gradient is w.r.t. its de-quantized weight, from its backward (nothing requires grad)
    owners = quantized_owners(model)
    shapes = OrderedDict((n, weight_shape(model, p, owners)) for n, p in eligible.items())

    def rounding(name: str) -> torch.Generator | None:
        return _rounding_generator(accumulate, device, seed, positions[name])

    def accumulators(names: Iterable[str]) -> OrderedDict[str, _Accumulator]:
        return OrderedDict((n, _Accumulator(shapes[n], eligible[n].device, accumulate, rounding(n))) for n in names)

    quantized = OrderedDict((n, owners[id(p)]) for n, p in eligible.items() if id(p) in owners)
    run = _Pass(model, batches, loss_fn, reduction, max_batches, progress, group, quantized)
    if slices == 1:
        acc = accumulators(eligible)
        count = run(eligible, acc, "calibration gradients", None)
        return OrderedDict((n, acc.pop(n).mean(count, p.device)) for n, p in eligible.items())  # each sum freed

    if not config.uses_gradients:
        raise ValueError(
            f"slices={slices} keeps the top entries of the scorer's gradient scores, but scorer "
            f"{config.scorer!r} reads no gradients: select(model, None, config) needs no calibration"
        )
    numels = {n: math.prod(shape) for n, shape in shapes.items()}
    k = selection_size(config, list(numels.values()))
    names = list(eligible)
    plan = [[names[i] for i in part] for part in slice_plan(list(numels.values()), slices)]
    cand_idx: OrderedDict[str, torch.Tensor] = OrderedDict()
    cand_val: OrderedDict[str, torch.Tensor] = OrderedDict()
    first_digest = None
    for number, part in enumerate(plan, 1):
        params = OrderedDict((n, eligible[n]) for n in part)
        acc = accumulators(part)
        digest = hashlib.blake2b(digest_size=16)
        count = run(params, acc, f"calibration gradients, slice {number}/{len(plan)}", digest)
        if first_digest is None:
            first_digest = digest.digest()
        elif digest.digest() != first_digest:
            raise ValueError(
                f"batches yielded other batches in pass {number} than in pass 1 (a shuffling DataLoader?), so the "
                f"slices would see different data: pass a list of batches, or a DataLoader without shuffling"
            )
        means = [acc.pop(n).mean(count, p.device) for n, p in params.items()]  # each accumulator freed as it goes
        # the running top-k: the candidates so far (global budget; with per_tensor a weight's top is final once its
        # slice is done) and this slice's weights, each list entry dropped as soon as its new candidates are cut
        kept = [*cand_idx, *params] if config.budget == "global" else list(params)
        old = len(kept) - len(params)
        offer_values = [*(cand_val.pop(n) for n in kept[:old]), *means]
        offer_indices = [*(cand_idx.pop(n) for n in kept[:old]), *([None] * len(params))]
        del means
        offered = sum(int(v.numel()) for v in offer_values)
        weights = [offer(model, eligible[n], idx, owners) for n, idx in zip(kept, offer_indices)]
        chosen = top_candidates(offer_values, weights, [numels[n] for n in kept], config, min(k, offered))
        del weights
        work = deque(zip(offer_values, offer_indices, chosen))
        del offer_values, offer_indices, chosen
        for name in kept:  # in the eligible order, so the dicts keep it
            values, previous, at = work.popleft()
            cand_val[name] = values.reshape(-1)[at.long()]
            cand_idx[name] = at if previous is None else previous[at.long()]
    return GradientCandidates(cand_idx, cand_val, shapes, config, plan)


def slice_plan(numels: Sequence[int], slices: int) -> list[range]:
    """Cut tensors of ``numels`` elements, in order, into at most ``slices`` contiguous groups (ranges of their
    positions) whose largest total is as small as possible; among such cuts, the one with the fewest groups (a
    pass that saves no memory only costs compute)."""

    def cut(capacity: int) -> list[range]:
        groups, start, size = [], 0, 0
        for i, n in enumerate(numels):
            if size + n > capacity and i > start:
                groups.append(range(start, i))
                start, size = i, 0
            size += n
        groups.append(range(start, len(numels)))
        return groups

    low, high = max(numels), sum(numels)
    while low < high:  # the smallest capacity that greedy cutting fits into `slices` groups is the optimum
        mid = (low + high) // 2
        if len(cut(mid)) <= slices:
            high = mid
        else:
            low = mid + 1
    return cut(low)


class _Pass:
    """One pass over the calibration data that accumulates the gradients of some eligible weights."""

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: LossFn,
        reduction: str,
        max_batches: int | None,
        progress: bool,
        group: Any,
        quantized: Mapping[str, nn.Module],
    ) -> None:
        self.model, self.batches, self.loss_fn, self.reduction = model, batches, loss_fn, reduction
        self.max_batches, self.progress, self.group = max_batches, progress, group
        self.quantized = quantized  # every eligible quantized layer: each pass runs them all the same way
        self.device = next(model.parameters()).device

    def __call__(
        self, params: Mapping[str, nn.Parameter], acc: OrderedDict[str, _Accumulator], desc: str, digest: Any
    ) -> int:
        """Accumulate ``params``' gradients into ``acc`` over the batches (feeding each batch to ``digest`` when
        given), all-reduce the sums; returns the count (examples or batches) over all ranks."""
        from .progress import progress_bar

        model, reduction, max_batches = self.model, self.reduction, self.max_batches
        count = n_batches = 0
        dense = OrderedDict((n, p) for n, p in params.items() if n not in self.quantized)
        on_grad = lambda name, grad: acc[name].add(grad)  # noqa: E731
        with only_these_require_grad(model, dense, on_grad), calibration_forwards(self.quantized, on_grad, params):
            bar = progress_bar(self.batches, total=max_batches, desc=desc, disable=not self.progress, unit="batch")
            for batch in bar:
                if max_batches is not None and n_batches >= max_batches:
                    break
                if digest is not None:
                    _digest(digest, batch)
                loss = self.loss_fn(model, to_device(batch, self.device))
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
        count = _all_reduce_sums(acc, count, self.group)
        if count == 0:
            raise ValueError("batches is empty: mean_gradients needs at least one calibration batch")
        return count


def _digest(h: Any, batch: Any) -> None:
    """Feed a (nested) batch's tensors (dtype, shape, bytes) and plain values (str, numbers, None) to ``h``."""
    if isinstance(batch, torch.Tensor):
        h.update(f"{batch.dtype}{tuple(batch.shape)}".encode())
        h.update(batch.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            h.update(repr(key).encode())
            _digest(h, value)
    elif isinstance(batch, (list, tuple)):
        h.update(b"[")
        for value in batch:
            _digest(h, value)
        h.update(b"]")
    elif batch is None or isinstance(batch, (str, int, float, bool)):
        h.update(repr(batch).encode())


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
