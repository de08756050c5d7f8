"""Input validation shared by every backend.

Each public op validates its arguments here *before* any backend touches memory, so a bad call raises a
``ValueError`` / ``TypeError`` that names the argument (and the tensor position) and modifies nothing.
None of these checks synchronizes with the device.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

SCORERS = ("gallop", "gradient", "magnitude", "product", "random")
SCORERS_WITHOUT_GRADS = ("magnitude", "random")
_INDEX_DTYPES = (torch.int32, torch.int64)


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


def check_same_device(named: Sequence[tuple[str, Optional[torch.Tensor]]]) -> None:
    first = None
    for name, t in named:
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(
                f"{name} is on {t.device} but {first[0]} is on {first[1]}; move all tensors to one device"
            )


def check_select_args(grads, weights, k, scorer: str, eps: float, seed: int) -> tuple[list, list]:
    """Validate ``select_topk`` arguments; returns (grads list with None entries, weights list)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}; got {scorer!r}")
    if isinstance(weights, torch.Tensor):
        raise TypeError("weights must be a sequence of tensors (a list), not a single tensor; wrap it: [w]")
    weights = list(weights)
    if grads is None:
        if scorer not in SCORERS_WITHOUT_GRADS:
            raise ValueError(f"grads is None but scorer {scorer!r} needs gradients; pass grads or use "
                             f"scorer='magnitude' or 'random'")
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
            if scorer not in SCORERS_WITHOUT_GRADS:
                raise ValueError(f"grads[{i}] is None but scorer {scorer!r} needs gradients")
            continue
        check_float(g, f"grads[{i}]")
        if g.shape != w.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but weights[{i}] has shape {tuple(w.shape)}")
    check_same_device([(f"weights[{i}]", w) for i, w in enumerate(weights)]
                      + [(f"grads[{i}]", g) for i, g in enumerate(grads)])
    total = sum(w.numel() for w in weights)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (the total number of elements), got {k}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return grads, weights


def check_adamw_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    named = [("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    for name, t in named:
        check_fp32_1d(t, name)
    for name, t in named[1:]:
        if t.numel() != param.numel():
            raise ValueError(f"{name} has length {t.numel()} but param has length {param.numel()}; "
                             f"all four buffers must have one length")
    check_same_device(named)
    check_hparams(step, lr, beta1, beta2, eps, weight_decay)


def check_hparams(step, lr, beta1, beta2, eps, weight_decay) -> None:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int (the 1-based step count), got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the 1-based step count, used in the bias corrections), got {step}")
    for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")


def check_gather_args(src, indices, out) -> None:
    check_float(src, "src")
    check_indices(indices)
    check_same_device([("src", src), ("indices", indices), ("out", out)])
    if out is not None:
        check_fp32_1d(out, "out")
        if out.numel() != indices.numel():
            raise ValueError(f"out has length {out.numel()} but indices has length {indices.numel()}")


def check_scatter_args(dst, indices, values, base) -> None:
    check_float(dst, "dst")
    if not dst.is_contiguous():
        raise ValueError("dst must be contiguous (it is written through a flat view); call .contiguous() "
                         "and write the result back")
    check_indices(indices)
    check_fp32_1d(values, "values")
    if values.numel() != indices.numel():
        raise ValueError(f"values has length {values.numel()} but indices has length {indices.numel()}")
    if base is not None:
        check_float(base, "base")
        if base.dim() != 1 or base.numel() != indices.numel():
            raise ValueError(f"base must be 1-D with length {indices.numel()} (one per index), "
                             f"got shape {tuple(base.shape)}")
    check_same_device([("dst", dst), ("indices", indices), ("values", values), ("base", base)])


def check_weight_grad_args(grad_output, input, indices) -> None:
    check_float(grad_output, "grad_output")
    check_float(input, "input")
    if grad_output.dtype != input.dtype:
        raise TypeError(f"grad_output is {grad_output.dtype} but input is {input.dtype}; cast both to one dtype "
                        f"(the autocast dtype under autocast)")
    if grad_output.dim() < 1 or input.dim() < 1 or grad_output.shape[:-1] != input.shape[:-1]:
        raise ValueError(f"grad_output {tuple(grad_output.shape)} and input {tuple(input.shape)} must share their "
                         f"leading (token) dimensions: [..., M] and [..., N]")
    check_indices(indices)
    check_same_device([("grad_output", grad_output), ("input", input), ("indices", indices)])
