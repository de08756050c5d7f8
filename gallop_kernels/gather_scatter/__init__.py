"""gather (dense -> fp32 values at flat indices) and scatter_ (``cast(base + values)`` into a dense tensor).

``reference.py``: index_select / index_copy_. ``triton.py``: the kernels (explicit round-to-nearest-even casts).
This module checks the arguments and registers the ``torch.library`` custom ops ``gallop::gather``,
``gallop::gather_into_`` (``gather`` with ``out=``) and ``gallop::scatter_``, each around the function of its name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._registry import implementation
from .._validate import (
    check_contiguous,
    check_float,
    check_fp32_1d,
    check_index_range,
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
    dst, indices, values, base, check_range: bool = True, nonfinite: str = "skip", names=("dst", "values")
) -> None:
    """Validate ``scatter_``'s arguments; ``names``: what the caller calls ``dst`` and ``values`` in errors."""
    dst_name, values_name = names
    check_nonfinite_option(nonfinite)
    check_float(dst, dst_name)
    check_contiguous(dst, dst_name, "it is written through a flat view; write the result back after the call")
    check_indices(indices)
    check_fp32_1d(values, values_name)
    if values.numel() != indices.numel():
        raise ValueError(f"{values_name} has length {values.numel()} but indices has length {indices.numel()}")
    if base is not None:
        check_float(base, "base")
        if base.dim() != 1 or base.numel() != indices.numel():
            raise ValueError(
                f"base must be 1-D with length {indices.numel()} (one per index), got shape {tuple(base.shape)}"
            )
    named = [(dst_name, dst), ("indices", indices), (values_name, values), ("base", base)]
    check_same_device(named)
    check_no_overlap(named)
    check_not_differentiable([(dst_name, dst)])
    if check_range:
        check_index_range(indices, dst.numel(), unique=True)


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
