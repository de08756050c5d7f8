"""SparseAdamW: a torch.optim.Optimizer running the fused gallop_kernels AdamW over the flat sparse delta."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Union

import torch

import gallop_kernels

from .sparse import SparseModel


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the sparse deltas (same math as ``torch.optim.AdamW``), one fused launch for the whole model.

    Args:
        params: a ``SparseModel`` (preferred: the weights are written back right after each step), or its
            ``parameters()`` (the write-back then happens at the next forward).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``. Decoupled weight decay shrinks the *delta*, so it
            pulls the fine-tuned weights toward the pretrained ones, not toward zero.
        max_grad_norm: if set, clip the sparse gradient to this global L2 norm before each step.
        step_in_backward: the fastest mode: each weight's post-accumulate-grad hook runs the fused
            gather + AdamW + write-back for that tensor during the backward pass (no dense grad survives, the
            optimizer overlaps with backward). ``step()`` then only advances the step count. It cannot combine
            with gradient accumulation or global clipping (the update happens before all grads exist). Needs a
            ``SparseModel``.

    Works with LR schedulers (``param_groups[*]["lr"]``), ``state_dict`` / ``load_state_dict``, and
    ``torch.nn.utils.clip_grad_norm_(sparse.parameters(), ...)``.
    """

    def __init__(self, params: Union[SparseModel, Iterable[torch.Tensor]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 max_grad_norm: Optional[float] = None, step_in_backward: bool = False) -> None:
        for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        self._sparse = params if isinstance(params, SparseModel) else None
        plist = list(self._sparse.parameters()) if self._sparse is not None else list(params)
        for i, p in enumerate(plist):
            if p.dtype != torch.float32 or not p.is_contiguous():
                raise TypeError(f"params[{i}] must be a contiguous fp32 tensor (a SparseModel delta), got "
                                f"{p.dtype}{'' if p.is_contiguous() else ', non-contiguous'}")
        if step_in_backward and self._sparse is None:
            raise ValueError("step_in_backward=True needs the SparseModel itself: SparseAdamW(sparse_model, ...)")
        if step_in_backward and max_grad_norm is not None:
            raise ValueError("step_in_backward=True cannot clip by the global norm (each tensor updates as soon as its "
                             "gradient exists); use max_grad_norm=None or the default mode")
        super().__init__(plist, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm
        self.step_in_backward = step_in_backward
        if step_in_backward:
            self._sparse._grad_callback = self._step_tensor

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def _step_tensor(self, i: int, dense_grad: torch.Tensor) -> None:
        """Step-in-backward: gather + AdamW + write-back for selected tensor ``i``, from its dense gradient."""
        sp = self._sparse
        group = self.param_groups[0]
        state = self._state(sp.delta)
        beta1, beta2 = group["betas"]
        gallop_kernels.sparse_adamw_step_(
            sp._params[i].detach(), dense_grad, sp._indices[i], sp._slice(sp.base, i), sp._slice(sp.delta.detach(), i),
            sp._slice(state["exp_avg"], i), sp._slice(state["exp_avg_sq"], i), step=int(state["step"]) + 1,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_in_backward:  # the updates already ran in the backward hooks
            for group in self.param_groups:
                for p in group["params"]:
                    self._state(p)["step"] += 1
            self._sparse._synced_version = self._sparse.delta._version  # weights were written in the hooks
            return loss
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.max_grad_norm)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                gallop_kernels.sparse_adamw_(p.detach().view(-1), p.grad.view(-1), state["exp_avg"].view(-1),
                                             state["exp_avg_sq"].view(-1), step=int(state["step"]), lr=group["lr"],
                                             beta1=beta1, beta2=beta2, eps=group["eps"],
                                             weight_decay=group["weight_decay"])
        if self._sparse is not None:
            self._sparse.sync()
        return loss
