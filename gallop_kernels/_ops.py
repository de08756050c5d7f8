"""The training-path ops as ``torch.library`` custom ops (namespace ``gallop``), with fake implementations.

Registered ops are opaque to ``torch.compile``: a compiled region calling them has no graph break, and the fake
(meta) implementations give shapes without running anything. Each op's body picks the backend at run time
(Triton on CUDA, reference elsewhere). ``select_topk`` is not registered: its output sizes depend on the data and
it runs once per fine-tuning job, outside any compiled region.

Arguments are validated by the public functions in ``api.py`` before they reach these ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backend import implementation


def sparse_adamw(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    implementation("sparse_adamw_", param.device)(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1,
                                                  beta2=beta2, eps=eps, weight_decay=weight_decay)


sparse_adamw_op = torch.library.custom_op("gallop::sparse_adamw_", sparse_adamw,
                                          mutates_args=("param", "exp_avg", "exp_avg_sq"))


@sparse_adamw_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    return None


def sparse_adamw_step(weight: Tensor, weight_grad: Tensor, indices: Tensor, base: Tensor, delta: Tensor,
                      exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float, beta1: float, beta2: float,
                      eps: float, weight_decay: float) -> None:
    implementation("sparse_adamw_step_", weight.device)(weight, weight_grad, indices, base, delta, exp_avg,
                                                       exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2,
                                                       eps=eps, weight_decay=weight_decay)


sparse_adamw_step_op = torch.library.custom_op("gallop::sparse_adamw_step_", sparse_adamw_step,
                                               mutates_args=("weight", "delta", "exp_avg", "exp_avg_sq"))


@sparse_adamw_step_op.register_fake
def _(weight, weight_grad, indices, base, delta, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
      weight_decay) -> None:
    return None


def gather(src: Tensor, indices: Tensor) -> Tensor:
    return implementation("gather", src.device)(src, indices, out=None, accumulate=False)


gather_op = torch.library.custom_op("gallop::gather", gather, mutates_args=())


@gather_op.register_fake
def _(src, indices):
    return torch.empty(indices.shape, dtype=torch.float32, device=src.device)


def gather_into(src: Tensor, indices: Tensor, out: Tensor, accumulate: bool) -> None:
    implementation("gather", src.device)(src, indices, out=out, accumulate=accumulate)


gather_into_op = torch.library.custom_op("gallop::gather_into_", gather_into, mutates_args=("out",))


@gather_into_op.register_fake
def _(src, indices, out, accumulate) -> None:
    return None


def scatter(dst: Tensor, indices: Tensor, values: Tensor, base: Optional[Tensor]) -> None:
    implementation("scatter_", dst.device)(dst, indices, values, base=base)


scatter_op = torch.library.custom_op("gallop::scatter_", scatter, mutates_args=("dst",))


@scatter_op.register_fake
def _(dst, indices, values, base) -> None:
    return None


def weight_grad_at(grad_output: Tensor, input: Tensor, indices: Tensor) -> Tensor:
    return implementation("weight_grad_at", grad_output.device)(grad_output, input, indices)


weight_grad_at_op = torch.library.custom_op("gallop::weight_grad_at", weight_grad_at, mutates_args=())


@weight_grad_at_op.register_fake
def _(grad_output, input, indices):
    return torch.empty(indices.shape, dtype=torch.float32, device=grad_output.device)
