"""Hugging Face Trainer integration: ``GallopTrainer`` trains a SparseModel with SparseAdamW.

A plain ``transformers.Trainer`` given the SparseModel as its model trains it correctly too (the deltas are the
wrapper's only parameters; its checkpoints hold the wrapper's ``state_dict``: the deltas, not the model).
``GallopTrainer`` adds: SparseAdamW built from the ``TrainingArguments`` (the fused step; non-finite steps are
skipped), and checkpoints that are adapter folders (``adapter_model.safetensors`` with the fp32 deltas, plus the
optimizer and scheduler state), resumed exactly by ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from .optim import SparseAdamW
from .sparse import SparseModel

TRAINING_ARGS_NAME = "training_args.bin"


class GallopTrainer(Trainer):
    """A ``transformers.Trainer`` that trains only the entries of a ``SparseModel``.

    Args:
        sparse_model: the SparseModel to train (or pass it as ``model=``).
        **kwargs: everything else ``Trainer`` takes (``args``, ``train_dataset``, ``data_collator``, ...). The
            optimizer is SparseAdamW from ``args`` (learning_rate, adam_beta1/2, adam_epsilon, weight_decay);
            clipping (``max_grad_norm``), accumulation, schedulers, bf16 and ``report_to`` are the Trainer's own.
    """

    def __init__(self, *, sparse_model: SparseModel | None = None, step_in_backward: bool = False, **kwargs) -> None:
        if step_in_backward:  # compatibility shim (gallop 0.1's mode): the argument goes in gallop 0.4
            raise ValueError("step_in_backward was removed in gallop 0.2 (the default step is as fast now); drop it")
        model = kwargs.pop("model", None)
        sparse = sparse_model if sparse_model is not None else model
        if not isinstance(sparse, SparseModel):
            raise TypeError(f"sparse_model must be a gallop SparseModel, got {type(sparse).__name__}")
        if model is not None and sparse_model is not None and model is not sparse_model:
            raise ValueError("pass the SparseModel once, as sparse_model= (or as model=), not two different models")
        self.sparse_model = sparse
        super().__init__(model=sparse, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            args = self.args
            self.optimizer = SparseAdamW(
                self.sparse_model,
                lr=args.learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
            )
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Checkpoints and ``save_model()`` write the adapter (with fp32 deltas), not the model."""
        output_dir = str(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        self.sparse_model.save_pretrained(output_dir, save_deltas=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.sparse_model.load_adapter_(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.sparse_model.load_adapter_(self.state.best_model_checkpoint)
