"""sparse_adamw_ (AdamW over flat fp32 buffers) and sparse_adamw_step_ (gather + AdamW + write-back, fused).

``reference.py``: torch.optim.AdamW's single-tensor math. ``triton.py``: the kernels. This module checks the
arguments and registers the ``torch.library`` custom ops ``gallop::sparse_adamw_`` and ``gallop::sparse_adamw_step_``
(opaque to torch.compile, with fake implementations) whose bodies, the functions of the same names, pick the
backend at run time.

The fused step lives here, not in a folder of its own, because it is this AdamW: both Triton kernels call the one
``_adamw_math``, which is what makes the checked step (``gather``, ``sparse_adamw_``, ``scatter_``) bit-identical to
the fused launch, and both take their scalars from one ``adamw_hparams``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._registry import implementation
from .._validate import (
    adamw_hparams,
    check_contiguous,
    check_float,
    check_fp32_1d,
    check_index_range,
    check_no_overlap,
    check_nonfinite_option,
    check_not_differentiable,
    check_same_device,
)
from ..gather_scatter import check_scatter_args


def check_sparse_adamw_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> dict:
    """Validate ``sparse_adamw_``'s arguments; returns the converted scalars."""
    named = [("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    for name, t in named:
        check_fp32_1d(t, name)
    for name, t in named[1:]:
        if t.numel() != param.numel():
            raise ValueError(
                f"{name} has length {t.numel()} but param has length {param.numel()}; all four buffers "
                f"must have one length"
            )
    check_same_device(named)
    check_no_overlap(named)
    check_not_differentiable([("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)])
    return adamw_hparams(step, lr, beta1, beta2, eps, weight_decay)


def check_sparse_adamw_step_args(
    weight,
    weight_grad,
    indices,
    base,
    delta,
    exp_avg,
    exp_avg_sq,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    check_indices: bool = True,
    nonfinite: str = "skip",
) -> dict:
    """Validate ``sparse_adamw_step_``'s arguments; returns the converted scalars."""
    check_nonfinite_option(nonfinite)
    check_float(weight_grad, "weight_grad")
    if weight_grad.shape != weight.shape:
        raise ValueError(f"weight_grad has shape {tuple(weight_grad.shape)} but weight has shape {tuple(weight.shape)}")
    check_contiguous(weight_grad, "weight_grad", "it is read as one flat array, like weight")
    check_scatter_args(weight, indices, delta, base, check_range=False, names=("weight", "indices", "delta", "base"))
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_fp32_1d(t, name)
        if t.numel() != delta.numel():
            raise ValueError(
                f"{name} has length {t.numel()} but delta has length {delta.numel()}; the state buffers "
                f"must have one length"
            )
    hyperparams = adamw_hparams(step, lr, beta1, beta2, eps, weight_decay)
    check_same_device([("weight", weight), ("weight_grad", weight_grad), ("exp_avg", exp_avg)])
    check_no_overlap(
        [
            ("weight", weight),
            ("weight_grad", weight_grad),
            ("indices", indices),
            ("base", base),
            ("delta", delta),
            ("exp_avg", exp_avg),
            ("exp_avg_sq", exp_avg_sq),
        ]
    )
    check_not_differentiable([("delta", delta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)])
    if check_indices:
        check_index_range(indices, weight.numel(), unique=True)
    return hyperparams


def sparse_adamw_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    implementation("sparse_adamw_", param.device)(
        param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
    )


sparse_adamw_op = torch.library.custom_op(
    "gallop::sparse_adamw_", sparse_adamw_, mutates_args=("param", "exp_avg", "exp_avg_sq")
)


@sparse_adamw_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    return None


def sparse_adamw_step_(
    weight: Tensor,
    weight_grad: Tensor,
    indices: Tensor,
    base: Tensor,
    delta: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    implementation("sparse_adamw_step_", weight.device)(
        weight,
        weight_grad,
        indices,
        base,
        delta,
        exp_avg,
        exp_avg_sq,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )


sparse_adamw_step_op = torch.library.custom_op(
    "gallop::sparse_adamw_step_", sparse_adamw_step_, mutates_args=("weight", "delta", "exp_avg", "exp_avg_sq")
)


@sparse_adamw_step_op.register_fake
def _(
    weight, weight_grad, indices, base, delta, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay
) -> None:
    return None
