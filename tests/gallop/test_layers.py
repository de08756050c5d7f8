"""The selected modules (gallop.layers): the custom autograd functions give the dense gradient at the selected
entries (linear, Conv1D, generic modules, tied weights, autocast), no dense weight gets a gradient, install and
uninstall."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gallop import SparseModel
from gallop.layers import DELTA, has_own_forward, install, is_conv1d, is_installed, kind_of, sparse_linear, uninstall

from ..models import random_batches
from .helpers import setup, tol

pytestmark = pytest.mark.usefixtures("backend")


def _dense_grads(model, sel, batch, autocast: bool = False):
    """The stock dense gradient of every selected weight (under bf16 autocast if asked), gathered at the selected
    entries."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in sel:
        params[n].requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = ref(**batch).loss
    loss.backward()
    return {n: params[n].grad.reshape(-1)[sel[n].long()] for n in sel}


def test_no_dense_weight_requires_grad_or_gets_one():
    model, sel = setup()
    sparse = SparseModel(model, sel)
    sparse(**random_batches(1)[0]).loss.backward()
    names = {id(p) for p in sparse.parameters()}
    for n, p in model.named_parameters():
        if id(p) not in names:
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama_tied", "gemma", "qwen2"])
def test_delta_gradient_equals_dense_gradient_at_the_entries(arch):
    """The custom autograd function's weight_grad_at matches the stock dense weight gradient, gathered."""
    model, sel = setup(arch)
    batch = random_batches(1, seed=4)[0]
    want = _dense_grads(model, sel, batch)
    sparse = SparseModel(model, sel)
    sparse(**batch).loss.backward()
    for name, delta in sparse.named_deltas().items():
        torch.testing.assert_close(delta.grad, want[name], **tol(torch.float32), msg=name)


def test_generic_module_and_tied_weight():
    """Non-linear modules (the embedding) train through the generic path; a tied embedding/head weight gets one
    delta whose gradient sums both uses."""
    model, sel = setup("llama_tied", target_modules=["embed_tokens", "q_proj"])
    assert "model.embed_tokens.weight" in sel
    batch = random_batches(1, seed=5)[0]
    want = _dense_grads(model, sel, batch)
    sparse = SparseModel(model, sel)
    assert model.lm_head.gallop_delta is model.model.embed_tokens.gallop_delta
    sparse(**batch).loss.backward()
    for name, delta in sparse.named_deltas().items():
        torch.testing.assert_close(delta.grad, want[name], **tol(torch.float32), msg=name)


def test_autocast_bf16_gradients_match_stock_autocast():
    model, sel = setup()
    batch = random_batches(1, seed=6)[0]
    stock = _dense_grads(model, sel, batch, autocast=True)
    sparse = SparseModel(model, sel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sparse(**batch).loss
    loss.backward()
    for name, delta in sparse.named_deltas().items():
        want = stock[name]
        scale = float(want.abs().max()) + 1e-12
        torch.testing.assert_close(delta.grad / scale, want / scale, **tol(torch.bfloat16), msg=name)


# ------------------------------------------------------------------------------------------------ the layer alone
@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_linear_alone_matches_f_linear_and_its_gradients(transposed):
    """Forward = F.linear on the merged weight; dx and dbias are the stock ones; ddelta is the dense weight gradient
    at the selected entries (for Conv1D's [in, out] weight too)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, requires_grad=True)
    w = torch.randn(4, 7, generator=gen)
    weight = w.t().contiguous() if transposed else w  # Conv1D stores [in, out]
    bias = torch.randn(4, generator=gen, requires_grad=True)
    indices = torch.tensor([0, 3, 9, 17, 27], dtype=torch.int64)
    delta = torch.zeros(indices.numel(), requires_grad=True)
    dy = torch.randn(5, 4, generator=gen)
    y = sparse_linear(x, weight, bias, delta, indices, transposed=transposed)
    y.backward(dy)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = weight.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, w2.t() if transposed else w2, b2)
    y2.backward(dy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)
    torch.testing.assert_close(delta.grad, w2.grad.reshape(-1)[indices], **tol(torch.float32))
    assert not weight.requires_grad and weight.grad is None


def test_a_selected_weight_that_requires_grad_is_refused():
    weight = torch.randn(4, 7, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        sparse_linear(torch.randn(2, 7), weight, None, torch.zeros(1, requires_grad=True), torch.tensor([0]))


def test_kind_of_each_module_type():
    from transformers.pytorch_utils import Conv1D

    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Conv1DLookalike(nn.Module):  # named like transformers' Conv1D, from elsewhere
        pass

    Conv1DLookalike.__name__ = "Conv1D"
    assert kind_of(nn.Linear(3, 2)) == "linear"
    assert is_conv1d(Conv1D(2, 3)) and kind_of(Conv1D(2, 3)) == "conv1d"
    assert not is_conv1d(Conv1DLookalike()) and kind_of(Conv1DLookalike()) == "generic"
    assert kind_of(OwnForward(3, 2)) == "generic"  # a subclass with its own forward keeps it (generic path)
    assert kind_of(nn.Embedding(5, 3)) == "generic"


def test_install_routes_the_forward_and_uninstall_restores_the_module():
    layer = nn.Linear(7, 4)
    keys = list(layer.state_dict())
    for p in layer.parameters():
        p.requires_grad_(False)
    indices = torch.tensor([1, 5, 20])
    base = layer.weight.detach().reshape(-1)[indices].float().clone()
    delta = nn.Parameter(torch.zeros(3))
    x = torch.randn(2, 7)
    install(layer, delta, indices, base)
    assert is_installed(layer) and has_own_forward(layer) and getattr(layer, DELTA) is delta
    assert list(layer.state_dict()) == keys  # the delta is the SparseModel's state, not the module's
    layer(x).sum().backward()
    assert delta.grad is not None and layer.weight.grad is None
    twin = copy.deepcopy(layer)
    assert twin.forward.module is twin  # the copy's forward runs the copy
    uninstall(layer)
    assert not is_installed(layer) and not has_own_forward(layer) and not hasattr(layer, "gallop_indices")
    assert list(layer.state_dict()) == keys
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
