"""gather (dense -> fp32 values at flat indices), scatter_ (``cast(base + values)`` into a dense tensor) and
scatter_grouped_ (``scatter_`` into many dense tensors at once: the write-back after a training step).

``reference.py``: index_select / index_copy_. ``triton.py``: the kernels (explicit round-to-nearest-even casts).
This module checks the arguments and registers the ``torch.library`` custom ops ``gallop::gather``,
``gallop::gather_into_`` (``gather`` with ``out=``), ``gallop::scatter_`` and ``gallop::scatter_grouped_``, each
around the function of its name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._registry import implementation
from .._validate import (
    check_contiguous,
    check_float,
    check_fp32_1d,
    check_index_range,
    check_index_ranges,
    check_indices,
    check_no_overlap,
    check_nonfinite_option,
    check_not_differentiable,
    check_same_device,
)


def check_gather_args(src, indices, out, check_range: bool = True) -> None:
    check_float(src, "src")
    check_contiguous(src, "src", "it is read as one flat array, and a copy of a whole weight is not made silently")
    check_indices(indices)
    check_same_device([("src", src), ("indices", indices), ("out", out)])
    if out is not None:
        check_fp32_1d(out, "out")
        if out.numel() != indices.numel():
            raise ValueError(f"out has length {out.numel()} but indices has length {indices.numel()}")
        check_no_overlap([("out", out), ("src", src), ("indices", indices)])
        check_not_differentiable([("out", out)])
    if check_range:
        check_index_range(indices, src.numel())


def check_scatter_args(
    dst,
    indices,
    values,
    base,
    check_range: bool = True,
    nonfinite: str = "skip",
    names: tuple[str, str, str, str] = ("dst", "indices", "values", "base"),
) -> None:
    """Validate ``scatter_``'s arguments; ``names``: what the caller calls ``dst``, ``indices``, ``values`` and
    ``base`` in errors."""
    check_nonfinite_option(nonfinite)
    _check_scatter_entry(dst, indices, values, base, names)
    named = list(zip(names, (dst, indices, values, base)))
    check_same_device(named)
    check_no_overlap(named)
    check_not_differentiable([(names[0], dst)])
    if check_range:
        check_index_range(indices, dst.numel(), names[1], unique=True)


def check_scatter_grouped_args(dsts, indices, values, bases, check_range: bool = True, nonfinite: str = "skip") -> None:
    """Validate ``scatter_grouped_``'s arguments: every entry's types, shapes and layouts as ``scatter_``'s (the
    names carry the position, ``dsts[3]``), every tensor on one device, no ``dsts[i]`` sharing memory with any other
    tensor of the call (the read-only ``indices``, ``values`` and ``bases`` may share memory with each other), and
    with ``check_range`` every ``indices[i]``'s range and uniqueness, in one device sync for the group. Each check
    runs once over the whole group (one sweep for the memory overlaps), so the host cost is a few microseconds an
    entry."""
    check_nonfinite_option(nonfinite)
    lists = {"dsts": dsts, "indices": indices, "values": values}
    if bases is not None:
        lists["bases"] = bases
    for name, seq in lists.items():
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors (one per dst), got {type(seq).__name__}")
    if len({len(seq) for seq in lists.values()}) > 1:
        got = ", ".join(f"{name} {len(seq)}" for name, seq in lists.items())
        raise ValueError(f"{', '.join(lists)} must have one entry per tensor, got lengths {got}")
    written, read = [], []
    for i, (dst, idx, vals) in enumerate(zip(dsts, indices, values)):
        base = None if bases is None else bases[i]
        names = (f"dsts[{i}]", f"indices[{i}]", f"values[{i}]", f"bases[{i}]")
        _check_scatter_entry(dst, idx, vals, base, names)
        written.append((names[0], dst))
        read += [(names[1], idx), (names[2], vals), (names[3], base)]
    check_same_device(written + read)
    check_no_overlap(written, read_only=read)
    check_not_differentiable(written)
    if check_range:
        ranges = [(f"indices[{i}]", idx, dst.numel()) for i, (dst, idx) in enumerate(zip(dsts, indices))]
        check_index_ranges(ranges, unique=True)


def _check_scatter_entry(dst, indices, values, base, names: tuple[str, str, str, str]) -> None:
    """One ``(dst, indices, values, base)`` entry's types, shapes and layouts (no device, memory or range check)."""
    dst_name, indices_name, values_name, base_name = names
    check_float(dst, dst_name)
    check_contiguous(dst, dst_name, "it is written through a flat view; write the result back after the call")
    check_indices(indices, indices_name)
    check_fp32_1d(values, values_name)
    if values.numel() != indices.numel():
        raise ValueError(f"{values_name} has length {values.numel()} but {indices_name} has length {indices.numel()}")
    if base is not None:
        check_float(base, base_name)
        if base.dim() != 1 or base.numel() != indices.numel():
            raise ValueError(
                f"{base_name} must be 1-D with length {indices.numel()} (one per index), got shape {tuple(base.shape)}"
            )


def gather(src: Tensor, indices: Tensor) -> Tensor:
    return implementation("gather", src.device)(src, indices, out=None, accumulate=False)


gather_op = torch.library.custom_op("gallop::gather", gather, mutates_args=())


@gather_op.register_fake
def _(src, indices):
    return torch.empty(indices.shape, dtype=torch.float32, device=src.device)


def gather_into_(src: Tensor, indices: Tensor, out: Tensor, accumulate: bool) -> None:
    implementation("gather", src.device)(src, indices, out=out, accumulate=accumulate)


gather_into_op = torch.library.custom_op("gallop::gather_into_", gather_into_, mutates_args=("out",))


@gather_into_op.register_fake
def _(src, indices, out, accumulate) -> None:
    return None


def scatter_(dst: Tensor, indices: Tensor, values: Tensor, base: Tensor | None) -> None:
    implementation("scatter_", dst.device)(dst, indices, values, base=base)


scatter_op = torch.library.custom_op("gallop::scatter_", scatter_, mutates_args=("dst",))


@scatter_op.register_fake
def _(dst, indices, values, base) -> None:
    return None


def scatter_grouped_(dsts: list[Tensor], indices: list[Tensor], values: list[Tensor], bases: list[Tensor]) -> None:
    """The backend's ``scatter_grouped_``; ``bases == []`` means no bases (a custom op takes no optional list)."""
    if dsts:
        implementation("scatter_grouped_", dsts[0].device)(dsts, indices, values, bases=bases or None)


scatter_grouped_op = torch.library.custom_op("gallop::scatter_grouped_", scatter_grouped_, mutates_args=("dsts",))


@scatter_grouped_op.register_fake
def _(dsts, indices, values, bases) -> None:
    return None
