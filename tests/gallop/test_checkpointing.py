"""Gradient checkpointing of a frozen model (gallop.checkpointing): the helpers alone, and calibration and sparse
training under reentrant and non-reentrant checkpointing."""

import copy
import pickle

import pytest
import torch
from torch import nn

from gallop import SparseModel, mean_gradients
from gallop.checkpointing import eval_but_keep_checkpointing, inputs_require_grad, uses_checkpointing

from ..models import random_batches, tiny
from .helpers import enable_checkpointing, setup, tol


def _disable(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def test_uses_checkpointing_follows_the_flag():
    model = tiny("llama")
    assert not uses_checkpointing(model)
    enable_checkpointing(model)
    assert uses_checkpointing(model)
    _disable(model)
    assert not uses_checkpointing(model)


def test_eval_but_keep_checkpointing_leaves_only_the_checkpointing_modules_in_training_mode():
    checkpointed = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    checkpointed.gradient_checkpointing = True
    plain = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model = nn.Sequential(checkpointed, plain).train()
    eval_but_keep_checkpointing(model)
    assert not model.training and checkpointed.training  # it recomputes only in training mode
    assert not any(m.training for m in checkpointed.children())  # its own dropout stays off
    assert not any(m.training for m in plain.modules())


class _Toy(nn.Module):
    """Input embeddings and one layer whose ``gradient_checkpointing`` flag the test sets (transformers' own
    checkpointing can add an input hook of its own, so the helper is tested alone here)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.layer = nn.Linear(3, 3)
        self.layer.gradient_checkpointing = False
        self.requires_grad_(False)  # frozen, as GaLLoP's models are

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def test_inputs_require_grad_only_while_checkpointing_and_grad_are_on():
    model = _Toy()
    ids = torch.tensor([[1, 2, 3]])
    handle = inputs_require_grad(model)
    assert handle is not None
    assert not model.embed(ids).requires_grad  # checkpointing off: nothing changes
    model.layer.gradient_checkpointing = True
    assert model.embed(ids).requires_grad  # looked up at each call: enabling it later is seen
    with torch.no_grad():
        assert not model.embed(ids).requires_grad
    assert model.embed.weight.grad is None and not model.embed.weight.requires_grad
    copied = copy.deepcopy(model)  # the hook is an object, not a closure: the copy's hook looks at the copy
    pickle.loads(pickle.dumps(model))
    copied.layer.gradient_checkpointing = False
    assert model.embed(ids).requires_grad and not copied.embed(ids).requires_grad
    handle.remove()
    assert not model.embed(ids).requires_grad
    assert inputs_require_grad(nn.Linear(2, 2)) is None  # no get_input_embeddings: nothing to hook


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model, sel = setup()
    batch = random_batches(1, seed=7)[0]
    plain = SparseModel(copy.deepcopy(model), sel)
    plain.train()
    plain(**batch).loss.backward()
    sparse = SparseModel(model, sel)
    enable_checkpointing(sparse, reentrant)
    sparse.train()
    sparse(**batch).loss.backward()
    for a, b in zip(plain.parameters(), sparse.parameters()):
        assert b.grad is not None
        torch.testing.assert_close(b.grad, a.grad, **tol(torch.float32))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_mean_gradient(reentrant):
    model = tiny("llama")
    batches = random_batches(2)
    want = mean_gradients(model, batches, progress=False)
    enable_checkpointing(model, reentrant)
    model.train()
    calls = []
    layer = model.model.layers[0]
    checkpoint = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw)
    got = mean_gradients(model, batches, progress=False)
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-8)
    assert len(calls) == len(batches)  # the layer ran through its checkpoint: checkpointing was active
    assert model.training and all(m.training for m in model.modules())  # every module's mode restored
