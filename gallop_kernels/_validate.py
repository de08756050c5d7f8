"""The validation primitives every op's argument checks are built from (each op folder's ``check_<op>_args``).

Each public op validates its arguments *before* any backend touches memory, so a bad call raises a ``ValueError``
/ ``TypeError`` that names the argument (and the tensor position) and modifies nothing. None of these checks
synchronizes with the device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, overload

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


def _scalar(v: Any) -> Any:
    """A 0-d (or one-element) tensor as its Python number; anything else unchanged."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex:
        return v.item()
    return v


def real(
    name: str,
    v: Any,
    *,
    low: float = -math.inf,
    low_open: bool = False,
    high: float = math.inf,
    high_open: bool = False,
) -> float:
    """``v`` as a finite float in the given range. Python, numpy and 0-d tensor scalars are accepted; bools are not."""
    v = _scalar(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(
            f"{name} must be a real number (Python, numpy or 0-d tensor scalar), got {type(v).__name__} {v!r}"
        )
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if f < low or (low_open and f == low) or f > high or (high_open and f == high):
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {v!r}")
    return f


def integer(name: str, v: Any, *, low: int | None = None, what: str = "") -> int:
    """``v`` as an int (Python, numpy or 0-d integer tensor scalar; not bool, not float), at least ``low``;
    ``what`` explains the argument in the error."""
    v = _scalar(v)
    what = f" ({what})" if what else ""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int{what}, got {type(v).__name__} {v!r}")
    i = int(v)
    if low is not None and i < low:
        raise ValueError(f"{name} must be >= {low}{what}, got {i}")
    return i


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, ...), got {t.dtype}")


def check_fp32_1d(t: torch.Tensor, name: str) -> None:
    check_float(t, name)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}; keep optimizer buffers in fp32")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() first")


def check_indices(indices: torch.Tensor, name: str = "indices") -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(indices.shape)}")


def check_contiguous(t: torch.Tensor, name: str, why: str) -> None:
    """Refuse a non-contiguous ``t`` (an argument the kernels read or write as one flat array, too large to copy
    silently); ``why`` says why in the error."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous ({why}); call {name}.contiguous() first")


@overload
def dense(t: torch.Tensor) -> torch.Tensor: ...
@overload
def dense(t: None) -> None: ...
def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with contiguous memory: itself when it already is, else one copy. For the ``K``-length arguments
    (indices, base values), whose copy is cheap next to the kernel that reads them; the kernels read flat memory."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def check_not_differentiable(named: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """Refuse, while grad mode is on, to write a tensor that requires grad: the kernels write memory behind
    autograd's back (and torch refuses an in-place write to such a leaf), so both backends refuse alike."""
    if not torch.is_grad_enabled():
        return
    for name, t in named:
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{name} requires grad, and this op writes it in place outside autograd: call it under "
                f"torch.no_grad(), or pass {name}.detach()"
            )


def check_same_device(named: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    first = None
    for name, t in named:
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{name} is on {t.device} but {first[0]} is on {first[1]}; move all tensors to one device")


def adamw_hparams(step, lr, beta1, beta2, eps, weight_decay) -> dict:
    """AdamW's scalars, checked and converted: the keyword arguments of every backend's AdamW."""
    return dict(
        step=integer("step", step, low=1, what="the 1-based step count, used in the bias corrections"),
        lr=real("lr", lr, low=0.0),
        beta1=real("beta1", beta1, low=0.0, high=1.0, high_open=True),
        beta2=real("beta2", beta2, low=0.0, high=1.0, high_open=True),
        eps=real("eps", eps, low=0.0, low_open=True),  # > 0: the update divides by sqrt(v) + eps, and v can be 0
        weight_decay=real("weight_decay", weight_decay, low=0.0),
    )


def check_index_range(indices: torch.Tensor, numel: int, name: str = "indices", *, unique: bool = False) -> None:
    """Every index in ``[0, numel)`` (and no index twice when ``unique``): one reduction and one device sync.

    Sorted indices pass the uniqueness check with one comparison; unsorted ones need a ``torch.unique``.
    """
    check_index_ranges([(name, indices, numel)], unique=unique)


def check_index_ranges(named: Sequence[tuple[str, torch.Tensor, int]], *, unique: bool = False) -> None:
    """``check_index_range`` for several ``(name, indices, numel)`` at once, with one device sync for all of them
    (and one ``torch.unique`` per unsorted tensor when ``unique``); the error names the first bad tensor."""
    named = [(name, idx, numel) for name, idx, numel in named if idx.numel()]
    if not named or torch.compiler.is_compiling():  # data-dependent: skipped inside torch.compile
        return
    parts = []
    for _, idx, _ in named:
        lo, hi = torch.aminmax(idx)
        parts += [lo.to(torch.int64), hi.to(torch.int64)]
        if unique:  # True for a single index: the comparison of an empty pair is vacuously sorted
            parts.append((idx[1:] > idx[:-1]).all().to(torch.int64))
    values = torch.stack(parts).tolist()
    width = 3 if unique else 2
    for i, (name, _, numel) in enumerate(named):
        lo, hi = values[width * i], values[width * i + 1]
        if lo < 0 or hi >= numel:
            raise ValueError(
                f"{name} must lie in [0, {numel}) (flat indices into a tensor of {numel} elements), got "
                f"min {lo} and max {hi}"
            )
    for i, (name, idx, _) in enumerate(named):
        if unique and not values[width * i + 2] and torch.unique(idx).numel() != idx.numel():
            raise ValueError(
                f"{name} holds duplicates: each entry may be written once (with duplicates, which "
                f"write wins is undefined); pass unique indices"
            )


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory a tensor may touch (conservative for non-contiguous tensors)."""
    if t.numel() == 0:
        return (0, 0)
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


def check_no_overlap(
    named: Sequence[tuple[str, torch.Tensor | None]], read_only: Sequence[tuple[str, torch.Tensor | None]] = ()
) -> None:
    """No two of the named tensors share memory (an op that writes one and reads another would race), and none of
    them shares memory with a ``read_only`` tensor; ``read_only`` tensors may share memory with each other. No sync.

    One sort of the tensors' byte spans, then one sweep: ``O(n log n)`` for an op over hundreds of tensors."""
    if torch.compiler.is_compiling():  # traced tensors have no addresses; checked when the code runs eagerly
        return
    everything = [*named, *read_only]
    spans = []
    for position, (_, t) in enumerate(everything):
        if t is not None and t.numel():
            start, end = _span(t)
            spans.append((t.get_device(), start, end, position))  # get_device: -1 on the CPU, else the index
    spans.sort()
    names = [name for name, _ in everything]
    device = None
    for dev, start, end, position in spans:
        if dev != device:  # per device: the span reaching furthest so far, among all and among the written ones
            device, furthest, furthest_written = dev, (0, -1), (0, -1)
        other = furthest if position < len(named) else furthest_written
        if start < other[0]:
            first, second = sorted([other[1], position])
            raise ValueError(
                f"{names[first]} and {names[second]} share memory: pass separate tensors (an op that writes one "
                f"while reading the other gives backend-dependent results)"
            )
        if end > furthest[0]:
            furthest = (end, position)
        if position < len(named) and end > furthest_written[0]:
            furthest_written = (end, position)


NONFINITE = ("skip", "raise", "assume_finite")


def check_nonfinite_option(nonfinite: str) -> None:
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf (one device sync); True inside torch.compile, where the check is skipped."""
    if torch.compiler.is_compiling() or not t.numel():
        return True
    return bool(torch.isfinite(t).all())
