"""Pure-PyTorch AdamW over flat buffers, and the fused gather + AdamW + write-back step: the CPU path and the
oracle for the Triton kernels. Inputs are assumed validated (``gallop_kernels.api`` does it)."""

from __future__ import annotations

import torch

from ..gather_scatter.reference import gather, scatter_


def sparse_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """torch.optim.AdamW's single-tensor math (amsgrad=False, maximize=False), in place."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / (bias_correction2**0.5)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def sparse_adamw_step_(
    weight: torch.Tensor,
    weight_grad: torch.Tensor,
    indices: torch.Tensor,
    base: torch.Tensor,
    delta: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """Gather ``weight_grad`` at ``indices``, AdamW-update ``delta``, write ``cast(base + delta)`` into ``weight``."""
    grad = gather(weight_grad, indices)
    sparse_adamw_(
        delta, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
    )
    scatter_(weight, indices, delta, base=base)
