"""Hugging Face Trainer integration: ``GallopTrainer`` trains a SparseModel with SparseAdamW.

It honours the Trainer's gradient accumulation, ``max_grad_norm`` clipping (on the sparse gradient), bf16/fp16
autocast, LR schedulers, and checkpoint save/resume (each checkpoint also holds the lossless fp32 adapter in
``gallop_adapter/``, restored on ``train(resume_from_checkpoint=...)``).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .io import load_delta_, save_adapter
from .optim import SparseAdamW
from .sparse import SparseModel

CHECKPOINT_ADAPTER_DIR = "gallop_adapter"


class _SparseCallback(TrainerCallback):
    """Clears the sparse gradient after each optimizer step (the Trainer zeroes only the model's own grads) and
    saves the fp32 adapter into every checkpoint."""

    def __init__(self, sparse: SparseModel) -> None:
        self.sparse = sparse

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparse.zero_grad()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            save_adapter(self.sparse, os.path.join(folder, CHECKPOINT_ADAPTER_DIR), precision="fp32")


class GallopTrainer(Trainer):
    """A ``transformers.Trainer`` that trains only the entries of a ``SparseModel``.

    Args:
        sparse_model: the SparseModel wrapping the model to train (``model`` is taken from it).
        step_in_backward: use SparseAdamW's step-in-backward mode (needs ``gradient_accumulation_steps == 1`` and
            ``max_grad_norm`` 0).
        **kwargs: everything else ``Trainer`` takes (``args``, ``train_dataset``, ``data_collator``, ...). The
            optimizer is SparseAdamW built from ``args`` (learning_rate, adam_beta1/2, adam_epsilon,
            weight_decay); pass ``optimizers=(None, scheduler)`` only to replace the scheduler.
    """

    def __init__(self, *, sparse_model: SparseModel, step_in_backward: bool = False, **kwargs) -> None:
        if not isinstance(sparse_model, SparseModel):
            raise TypeError(f"sparse_model must be a gallop SparseModel, got {type(sparse_model).__name__}")
        if kwargs.get("model") is not None and kwargs["model"] is not sparse_model.model:
            raise ValueError("model differs from sparse_model.model; pass only sparse_model=")
        kwargs["model"] = sparse_model.model
        self.sparse_model = sparse_model
        self.step_in_backward = step_in_backward
        super().__init__(**kwargs)
        if step_in_backward and (self.args.gradient_accumulation_steps != 1 or self.args.max_grad_norm):
            raise ValueError("step_in_backward=True needs gradient_accumulation_steps=1 and max_grad_norm=0")
        self.add_callback(_SparseCallback(sparse_model))

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            args = self.args
            # Clip inside the optimizer only if this Trainer has no _clip_grad_norm hook to route to the sparse grads.
            clip_in_optimizer = (not hasattr(Trainer, "_clip_grad_norm")) and args.max_grad_norm
            self.optimizer = SparseAdamW(self.sparse_model, lr=args.learning_rate,
                                         betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                         weight_decay=args.weight_decay,
                                         max_grad_norm=args.max_grad_norm if clip_in_optimizer else None,
                                         step_in_backward=self.step_in_backward)
        return self.optimizer

    def _clip_grad_norm(self, model):
        return self.sparse_model.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            grad_norm = self.sparse_model.grad_norm()
        return float(grad_norm)

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, **kwargs):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir!r} to resume from")
        if resume_from_checkpoint:
            adapter = os.path.join(resume_from_checkpoint, CHECKPOINT_ADAPTER_DIR)
            if not os.path.isdir(adapter):
                raise ValueError(f"{resume_from_checkpoint!r} has no {CHECKPOINT_ADAPTER_DIR}/: it was not written by "
                                 f"GallopTrainer")
            load_delta_(self.sparse_model, adapter)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
