"""Gradient (activation) checkpointing of a transformers model, as calibration and sparse training meet it.

Two facts live here:

* transformers' checkpointing layers recompute only in training mode, so calibration (eval mode, no dropout) keeps
  those layers in training mode to keep the memory savings (``eval_but_keep_checkpointing``);
* torch's *reentrant* checkpoint gives its output a gradient only when one of its tensor inputs requires grad. With
  a frozen model (GaLLoP trains deltas or, in calibration, only some weights) the hidden states entering the first
  checkpointed layer do not, so no gradient would reach the weights inside it: an error at ``backward`` in some
  transformers releases, nothing trained in others. ``inputs_require_grad`` makes the input embeddings' output
  require grad while checkpointing is on, as PEFT's ``enable_input_require_grads`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def uses_checkpointing(model: nn.Module) -> bool:
    """True when some module of ``model`` has transformers' ``gradient_checkpointing`` flag set."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def eval_but_keep_checkpointing(model: nn.Module) -> None:
    """Eval mode (no dropout) everywhere but in the modules that checkpoint activations (transformers' layers with
    ``gradient_checkpointing = True``, which only recompute in training mode); their own submodules stay in eval."""
    model.eval()
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.train()
            for child in m.children():
                child.eval()


class _OutputRequiresGrad:
    """The forward hook of ``inputs_require_grad``: a class (not a closure) so that a model carrying it can be
    pickled and deep-copied (the copy's hook then looks at the copied model)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if (
            isinstance(output, torch.Tensor)
            and output.is_floating_point()
            and torch.is_grad_enabled()
            and not output.requires_grad
            and uses_checkpointing(self.model)
        ):
            return output.requires_grad_(True)
        return output


def inputs_require_grad(model: nn.Module) -> RemovableHandle | None:
    """A forward hook on ``model.get_input_embeddings()`` that makes its output require grad whenever gradients are
    enabled and a module of ``model`` has checkpointing on (looked up at each call, so enabling checkpointing later
    is seen). Returns the hook's handle, or None for a model without ``get_input_embeddings``.

    The extra cost is the gradient of the embeddings' output (one activation-sized tensor); the embedding weights
    are not touched."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Module):
        return None
    return embeddings.register_forward_hook(_OutputRequiresGrad(model))
