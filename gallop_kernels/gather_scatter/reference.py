"""Pure-PyTorch gather from a dense tensor at flat indices (to fp32) and scatter of ``cast(base + values)`` into it
(one tensor, or a group): the CPU path and the oracle for the Triton kernels. Inputs are assumed validated
(``gallop_kernels.api``)."""

from __future__ import annotations

import torch


def gather(
    src: torch.Tensor, indices: torch.Tensor, *, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """fp32 ``src.reshape(-1)[indices]``, written into (or, with accumulate, added to) ``out``."""
    vals = src.reshape(-1).index_select(0, indices).to(torch.float32)
    if out is None:
        return vals
    if accumulate:
        out.add_(vals)
    else:
        out.copy_(vals)
    return out


def scatter_(
    dst: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, *, base: torch.Tensor | None = None
) -> None:
    """``dst.view(-1)[indices] = cast(base + values)`` (fp32 sum, one rounding), or ``cast(values)``."""
    vals = values if base is None else base.to(torch.float32) + values
    dst.view(-1).index_copy_(0, indices.to(torch.int64), vals.to(dst.dtype))


def scatter_grouped_(
    dsts: list[torch.Tensor],
    indices: list[torch.Tensor],
    values: list[torch.Tensor],
    *,
    bases: list[torch.Tensor] | None = None,
) -> None:
    """``scatter_`` for every entry: ``dsts[i].view(-1)[indices[i]] = cast(bases[i] + values[i])``."""
    for i, (dst, idx, vals) in enumerate(zip(dsts, indices, values)):
        scatter_(dst, idx, vals, base=None if bases is None else bases[i])
