"""Memory layouts for the kernel tests: the same values as a contiguous, strided, transposed, expanded or offset
view, so a test can check every op reads (or refuses) each layout (issue 20)."""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "strided", "transposed", "expanded", "offset")


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in the given memory layout (``expanded``: its first element broadcast to ``t``'s shape)."""
    if layout == "contiguous":
        return t.clone()
    if layout == "offset":  # contiguous, but not at the start of its storage
        buf = torch.zeros(t.numel() + 3, dtype=t.dtype)
        buf[3:] = t.reshape(-1)
        return buf[3:].view(t.shape)
    if layout == "strided":  # every other element of a wider tensor
        buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        view = buf[..., ::2]
        view.copy_(t)
        return view
    if layout == "transposed":  # column-major (a 1-D tensor: a column of a row-major matrix)
        if t.dim() == 1:
            buf = torch.zeros(t.numel(), 3, dtype=t.dtype)
            buf[:, 1] = t
            return buf[:, 1]
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded":  # stride 0
        first = t.reshape(-1)[:1] if t.numel() else t.new_zeros(1)  # an empty tensor expands from any value
        return first.reshape([1] * t.dim()).expand(t.shape)
    raise AssertionError(layout)
