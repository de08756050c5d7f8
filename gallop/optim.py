"""SparseAdamW: a ``torch.optim.Optimizer`` running the fused gallop_kernels AdamW over the sparse deltas."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable

import torch

import gallop_kernels

from .sparse import SparseModel

logger = logging.getLogger(__name__)
NONFINITE = ("skip", "raise")


def flat_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat fp32 tensor whose consecutive slices are ``tensors`` (the deltas of a SparseModel are), or None."""
    first = tensors[0]
    storage = first.untyped_storage()
    ptr = first.data_ptr()
    total = 0
    for t in tensors:
        if (
            t.dtype != torch.float32
            or not t.is_contiguous()
            or t.data_ptr() != ptr
            or t.untyped_storage().data_ptr() != storage.data_ptr()
        ):
            return None
        ptr += 4 * t.numel()
        total += t.numel()
    return first.detach().new_empty(0).set_(storage, first.storage_offset(), (total,), (1,))


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the sparse deltas, with exactly ``torch.optim.AdamW``'s math, in one fused launch per group.

    Args:
        params: a ``SparseModel``, or its ``parameters()`` / param groups. Either way the weights are written back
            right after each step (by the SparseModel's optimizer step post-hook).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``, except that ``eps`` must be > 0 (an entry whose
            gradient is exactly 0 would otherwise divide 0 by 0 and write NaN). Decoupled weight decay shrinks the
            *delta*, so it pulls the fine-tuned weights toward the pretrained ones, not toward zero.
        max_grad_norm: if set, clip the gradients to this global L2 norm before each step (like
            ``clip_grad_norm_``; leave it None when the training loop clips, as the Trainer does).
        nonfinite: what a step whose gradient holds NaN or Inf does: ``"skip"`` (default) leaves the deltas, the
            moments and the step count untouched, counts it in ``skipped_steps`` and warns; ``"raise"`` raises
            ``FloatingPointError``. Either way no non-finite value reaches a weight or the optimizer state.

    All selected entries of a group are updated by one ``gallop_kernels.sparse_adamw_`` launch over flat buffers
    (the deltas of a SparseModel are slices of one flat tensor). Works with LR schedulers, ``state_dict`` /
    ``load_state_dict``, ``clip_grad_norm_`` and gradient accumulation.
    """

    keeps_deltas_finite = True  # tells the write-back hook it need not check (a non-finite step is never taken)

    def __init__(
        self,
        params: SparseModel | Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip",
        step_in_backward: bool = False,
    ) -> None:
        if step_in_backward:  # compatibility shim (gallop 0.1's mode): the argument goes in gallop 0.4
            raise ValueError(
                "step_in_backward was removed in gallop 0.2: delta gradients now come from autograd, so "
                "no dense gradient exists to free early and the default mode is as fast; drop the "
                "argument"
            )
        lr = gallop_kernels.check_real("lr", lr, low=0.0)
        eps = gallop_kernels.check_real(
            "eps", eps, low=0.0, low_open=True
        )  # > 0: the update divides by sqrt(v) + eps, and v can be 0
        weight_decay = gallop_kernels.check_real("weight_decay", weight_decay, low=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        betas = (
            gallop_kernels.check_real("betas[0]", betas[0], low=0.0),
            gallop_kernels.check_real("betas[1]", betas[1], low=0.0),
        )
        if not all(b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if max_grad_norm is not None:
            max_grad_norm = gallop_kernels.check_real("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
        self._sparse = params if isinstance(params, SparseModel) else None
        if self._sparse is not None:
            params = self._sparse.trainable_parameters()
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.dtype != torch.float32 or not p.is_contiguous():
                    raise TypeError(
                        f"param_groups[{g}]['params'][{i}] must be a contiguous fp32 tensor (a "
                        f"SparseModel delta), got {p.dtype}{'' if p.is_contiguous() else ', non-contiguous'}"
                    )
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned_missing = False

    # ------------------------------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._packed.clear()  # the loaded moments are separate tensors: pack them again at the next step
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and isinstance(st.get("step"), torch.Tensor):
                    st["step"] = int(st["step"].item())

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict) and "eps" in param_group:  # a group's own eps obeys the constructor's rule
            param_group = {
                **param_group,
                "eps": gallop_kernels.check_real("param_group['eps']", param_group["eps"], low=0.0, low_open=True),
            }
        super().add_param_group(param_group)
        if hasattr(self, "_packed"):
            self._packed.clear()

    def _moments(self, g: int, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat exp_avg / exp_avg_sq of group ``g``; each param's state holds views of them."""
        packed = self._packed.get(g)
        if packed is not None and self._views_of(packed, params):
            return packed
        n = sum(p.numel() for p in params)
        device = params[0].device
        m = torch.zeros(n, dtype=torch.float32, device=device)
        v = torch.zeros(n, dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            st = self.state[p]
            k = p.numel()
            if "exp_avg" in st:
                m[offset : offset + k].copy_(st["exp_avg"].reshape(-1))
                v[offset : offset + k].copy_(st["exp_avg_sq"].reshape(-1))
            st.setdefault("step", 0)
            st["exp_avg"] = m[offset : offset + k].view_as(p)
            st["exp_avg_sq"] = v[offset : offset + k].view_as(p)
            offset += k
        self._packed[g] = (m, v)
        return m, v

    def _views_of(self, packed, params) -> bool:
        m, v = packed
        offset = 0
        for p in params:
            st = self.state.get(p)
            if not st or "exp_avg" not in st:
                return False
            if (
                st["exp_avg"].data_ptr() != m.data_ptr() + 4 * offset
                or st["exp_avg_sq"].data_ptr() != v.data_ptr() + 4 * offset
            ):
                return False
            offset += p.numel()
        return offset == m.numel()

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for g, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                groups.append((g, group, params))
        self._warn_missing_grads()
        if not groups:
            return loss
        grads = [torch.cat([p.grad.reshape(-1) for p in params]) for _, _, params in groups]
        finite = torch.stack([torch.isfinite(gr).all() for gr in grads]).all()
        if not bool(finite):
            self._nonfinite_step([p for _, _, ps in groups for p in ps])
            return loss
        if self.max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(gr) for gr in grads]))
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            for gr in grads:
                gr.mul_(coef)
        for (g, group, params), grad in zip(groups, grads):
            self._step_group(g, group, params, grad)
        return loss  # the SparseModel's optimizer step post-hook writes the weights back

    def _step_group(self, g: int, group: dict, params: list[torch.Tensor], grad: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        hp = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        if len(params) == len(group["params"]):
            m, v = self._moments(g, params)
            steps = {int(self.state[p]["step"]) for p in params}
            if len(steps) == 1:  # the common case: one launch for the whole group
                step = steps.pop() + 1
                flat = flat_view(params)
                if flat is not None:  # the deltas are slices of one tensor: update it in place
                    gallop_kernels.sparse_adamw_(flat, grad, m, v, step=step, nonfinite="assume_finite", **hp)
                else:  # separate storages: update a packed copy, then copy back
                    work = torch.cat([p.detach().reshape(-1) for p in params])
                    gallop_kernels.sparse_adamw_(work, grad, m, v, step=step, nonfinite="assume_finite", **hp)
                    torch._foreach_copy_(
                        [p.detach().view(-1) for p in params], list(work.split([p.numel() for p in params]))
                    )
                for p in params:
                    self.state[p]["step"] = step
                    torch.autograd.graph.increment_version(p)
                return
        # Some params have no grad this step (skipped, as torch.optim.AdamW skips them) or differ in step count.
        offset = 0
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                self._moments(g, group["params"])
                st = self.state[p]
            st["step"] = int(st["step"]) + 1
            k = p.numel()
            gallop_kernels.sparse_adamw_(
                p.detach().reshape(-1),
                grad[offset : offset + k],
                st["exp_avg"].reshape(-1),
                st["exp_avg_sq"].reshape(-1),
                step=st["step"],
                nonfinite="assume_finite",
                **hp,
            )
            torch.autograd.graph.increment_version(p)
            offset += k

    def _nonfinite_step(self, params: list[torch.Tensor]) -> None:
        names = {}
        if self._sparse is not None:
            names = {id(p): n for n, p in self._sparse.named_deltas().items()}
        bad = [
            names.get(id(p), f"param {i}")
            for i, p in enumerate(params)
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        msg = (
            f"the gradient holds NaN or Inf in {len(bad)} selected tensors (first: {bad[0]!r}); the step was "
            f"skipped: deltas, moments and step count are unchanged"
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(msg + " (SparseAdamW(nonfinite='skip') skips such steps instead)")
        self.skipped_steps += 1
        warnings.warn(f"{msg} ({self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=3)

    def _warn_missing_grads(self) -> None:
        if self._warned_missing or self._sparse is None:
            return
        missing = [n for n, p in self._sparse.named_deltas().items() if p.grad is None]
        if missing and len(missing) < len(self._sparse.named_deltas()):
            self._warned_missing = True
            logger.warning(
                "%d of %d selected tensors got no gradient this step (first: %r): they are skipped, as "
                "torch.optim.AdamW skips them. If the model uses these weights outside their module's "
                "forward, GaLLoP cannot train them",
                len(missing),
                len(self._sparse.named_deltas()),
                missing[0],
            )
