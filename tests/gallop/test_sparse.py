"""SparseModel as an nn.Module: the deltas are its parameters, their gradients come from autograd, the weights stay
merged in place and are written back after any optimizer. Every test runs on both kernel backends."""

import copy
import pickle

import pytest
import torch

import gallop_kernels as gk
from gallop import GallopConfig, SparseAdamW, SparseModel, select
from gallop.selection import Selection

from ..models import random_batches, tiny
from .helpers import adam_tol, changed_entries, setup, snapshot, tol, train, twins, weights

pytestmark = pytest.mark.usefixtures("backend")


# ------------------------------------------------------------------------------------------------ module semantics
def test_parameters_are_exactly_the_deltas():
    model, sel = setup()
    sparse = SparseModel(model, sel)
    params = list(sparse.parameters())
    assert len(params) == len(sel) and sum(p.numel() for p in params) == sel.num_selected
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert [n for n, _ in sparse.named_parameters()] == [f"deltas.{n}" for n in sel]
    # the model's own weights are all frozen; its only trainable parameters are the same deltas
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert set(sparse.state_dict()) == {"selection_fingerprint", *(f"deltas.{n}" for n in sel)}


def test_zero_grad_clears_the_sparse_gradient():
    """A loop that only calls model.zero_grad() (as the Trainer does) must not accumulate gradients."""
    model, sel = setup()
    sparse = SparseModel(model, sel)
    b = random_batches(1)[0]
    sparse(**b).loss.backward()
    first = [p.grad.clone() for p in sparse.parameters()]
    sparse.zero_grad()
    assert all(p.grad is None for p in sparse.parameters())
    sparse(**b).loss.backward()
    for a, p in zip(first, sparse.parameters()):
        torch.testing.assert_close(p.grad, a, **tol(torch.float32))


def test_wrapper_falls_through_to_the_model():
    model, sel = setup()
    sparse = SparseModel(model, sel)
    assert sparse.config is model.config
    assert "labels" in __import__("inspect").signature(sparse.forward).parameters  # the Trainer reads it
    out = sparse.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)
    assert sparse.get_base_model() is model and sparse.model is model
    assert isinstance(sparse, SparseModel) and isinstance(sparse, torch.nn.Module)


def test_print_trainable_parameters(capsys):
    model, sel = setup()
    sparse = SparseModel(model, sel)
    sparse.print_trainable_parameters()
    out = capsys.readouterr().out
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable params: {sel.num_selected:,} || all params: {total:,}" in out


def test_deepcopy_and_pickle_train_their_own_copy():
    model, sel = setup()
    sparse = SparseModel(model, sel)
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        assert clone.model is not model
        before = [p.detach().clone() for p in sparse.parameters()]
        train(clone, SparseAdamW(clone, lr=1e-2), random_batches(2))
        assert all(torch.equal(a, p) for a, p in zip(before, sparse.parameters()))  # the original is untouched
        assert any(float(p.detach().abs().sum()) > 0 for p in clone.parameters())
        mine = dict(model.named_parameters())
        changed = sum(int((p != mine[n]).sum()) for n, p in clone.model.named_parameters())
        assert changed > 0  # the copy's forward uses the copy's deltas


def test_dtype_change_is_refused_and_device_move_kept():
    model, sel = setup()
    sparse = SparseModel(model, sel)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="cast the model before wrapping"):
        sparse.half()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert sparse.to("cpu") is sparse
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(2))
    from gallop.optim import flat_view

    assert flat_view(sparse.trainable_parameters()) is not None  # one flat storage again after the move


# ------------------------------------------------------------------------------------------------ training
def test_density_one_equals_dense_adamw():
    """At density 1.0, sparse training is dense AdamW on the eligible weights (10 steps, fp32)."""
    model, sel = setup(density=1.0)
    dense = copy.deepcopy(model)
    sparse = SparseModel(model, sel)
    params = dict(dense.named_parameters())
    for p in dense.parameters():
        p.requires_grad_(False)
    for n in sel:
        params[n].requires_grad_(True)
    batches = random_batches(10, seed=3)
    train(sparse, SparseAdamW(sparse, lr=1e-3), batches)
    train(dense, torch.optim.AdamW([params[n] for n in sel], lr=1e-3, weight_decay=0.0, foreach=False), batches)
    got = dict(model.named_parameters())
    for n, b in dense.named_parameters():
        torch.testing.assert_close(got[n], b, **adam_tol(1e-3, 10), msg=n)


def test_unselected_weights_bit_identical_and_selected_move():
    model, sel = setup(density=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-2, weight_decay=0.1), random_batches(5, seed=1))
    moved = 0
    params = dict(model.named_parameters())
    for n, want in before.items():
        p = params[n].detach().reshape(-1)
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        if n in sel:
            mask[sel[n].long()] = True
        assert torch.equal(p[~mask], want.reshape(-1)[~mask]), n
        moved += int((p[mask] != want.reshape(-1)[mask]).sum())
    assert moved > 0.9 * sel.num_selected


@pytest.mark.parametrize("optimizer", ["sparse_adamw", "torch_adamw", "torch_adamw_fused", "torch_sgd"])
def test_weights_move_after_any_optimizer(optimizer):
    """The write-back happens right after every optimizer's step, on every backend. Neither a Triton launch nor
    torch's fused AdamW moves a version counter: the first made SparseAdamW train nothing on CUDA in 0.1."""
    model, sel = setup()
    before = snapshot(model)
    sparse = SparseModel(model, sel)
    opt = {
        "sparse_adamw": lambda: SparseAdamW(sparse, lr=1e-2),
        "torch_adamw": lambda: torch.optim.AdamW(sparse.parameters(), lr=1e-2),
        "torch_adamw_fused": lambda: torch.optim.AdamW(sparse.parameters(), lr=1e-2, fused=True),
        "torch_sgd": lambda: torch.optim.SGD(sparse.parameters(), lr=1.0),
    }[optimizer]()
    train(sparse, opt, random_batches(2))  # no forward after the last step: the weights must be current already
    for name, delta in sparse.named_deltas().items():
        w = dict(model.named_parameters())[name].detach().reshape(-1)[sel[name].long()]
        base = before[name].reshape(-1)[sel[name].long()]
        torch.testing.assert_close(w, (base + delta.detach()).to(w.dtype), rtol=0, atol=0)
    assert changed_entries(model, before) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_back_is_one_grouped_call_bit_identical_to_the_per_tensor_loop(monkeypatch, dtype):
    """A step's write-back is one scatter_grouped_ call for every selected weight, and writes exactly the bits the
    per-tensor scatter_ loop (gallop 0.2's write-back) wrote; unmerge restores the pretrained bits the same way."""
    model, sel = setup(dtype=dtype)
    pretrained = snapshot(model)
    sparse = SparseModel(model, sel)
    calls = []
    grouped = gk.scatter_grouped_
    monkeypatch.setattr(
        gk, "scatter_grouped_", lambda dsts, *a, **kw: (calls.append(len(dsts)), grouped(dsts, *a, **kw))
    )
    opt = SparseAdamW(sparse, lr=1e-2)
    sparse(**random_batches(1)[0]).loss.backward()
    opt.step()
    assert calls == [len(sel)], "the step's write-back must be one call for all weights"
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for d in sparse.parameters():
            d.copy_(torch.randn(d.shape, generator=gen) * 3e-3)
    loop = {}
    for t in sparse._targets:  # the old write-back: one scatter_ per weight, on a copy
        w = t.weight.detach().clone()
        gk.scatter_(w, t.indices, t.delta.detach(), base=t.base, check_indices=False, nonfinite="assume_finite")
        loop[t.name] = w
    calls.clear()
    sparse.write_back()
    assert calls == [len(sel)]
    for name, w in weights(model).items():
        want = loop.get(name, pretrained[name])
        assert torch.equal(w.detach().view(torch.uint8), want.view(torch.uint8)), name
    sparse.unmerge()
    assert calls == [len(sel)] * 2
    assert all(
        torch.equal(w.detach().view(torch.uint8), pretrained[n].view(torch.uint8)) for n, w in weights(model).items()
    )


def test_functional_ops_move_version_counters():
    """An in-place gallop_kernels op on a delta (either backend) is seen by the lazy write-back."""
    model, sel = setup()
    sparse = SparseModel(model, sel)
    name, delta = next(iter(sparse.named_deltas().items()))
    w = dict(model.named_parameters())[name]
    grad = torch.ones_like(delta)
    st = [torch.zeros_like(delta), torch.zeros_like(delta)]
    gk.sparse_adamw_(delta.detach(), grad, *st, step=1, lr=0.5)
    sparse.eval()
    with torch.no_grad():
        sparse(**random_batches(1)[0])
    state = sparse.export_state()[0]
    assert float(state.deltas.abs().min()) > 0.4
    assert torch.equal(w.detach().reshape(-1)[sel[name].long()], state.base + state.deltas)


def test_gradient_accumulation_equals_big_batch():
    s1, m1, s2, m2 = twins()
    batches = random_batches(4, batch=4, seed=5)
    train(s1, SparseAdamW(s1, lr=1e-2, max_grad_norm=0.5), batches, accumulate=1)
    train(s2, SparseAdamW(s2, lr=1e-2, max_grad_norm=0.5), batches, accumulate=2)
    for a, b in zip(s1.parameters(), s2.parameters()):
        torch.testing.assert_close(a, b, **adam_tol(1e-2, 4))


def test_bf16_model_moves_at_small_lr():
    """fp32 master deltas accumulate updates a bf16 weight could not absorb on its own."""
    model, sel = setup(dtype=torch.bfloat16)
    before = snapshot(model)
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-5), random_batches(30, seed=4))
    assert changed_entries(model, before) > 0
    for s in sparse.export_state():
        w = weights(model)[s.name].detach().reshape(-1)[s.indices]
        assert torch.equal(w, s.values)  # cast(base + delta), rounded once


def test_compiled_model_trains_like_eager():
    """torch.compile: same gradients (dtype tolerance), same training (Adam tolerance), no recompiles per step."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    s1, m1, s2, m2 = twins()
    batches = random_batches(3, seed=3)
    compiled = torch.compile(s2, backend="aot_eager")
    s1(**batches[0]).loss.backward()
    compiled(**batches[0]).loss.backward()
    for a, b in zip(s1.parameters(), s2.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tol(torch.float32))
    s1.zero_grad()
    s2.zero_grad()
    train(s1, SparseAdamW(s1, lr=1e-2), batches)
    train(compiled, SparseAdamW(s2, lr=1e-2), batches)
    for a, b in zip(s1.parameters(), s2.parameters()):
        torch.testing.assert_close(b, a, **adam_tol(1e-2, 3))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


# ------------------------------------------------------------------------------------------------ merge / unload
def test_merge_unmerge_exact_and_unload():
    model, sel = setup()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(3))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n in original}
    sparse.unmerge()
    assert not sparse.merged
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters() if n in original)
    sparse.merge()
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in original)
    plain = sparse.merge_and_unload()
    assert plain is model
    assert [n for n, _ in model.named_parameters()] == list(original)  # no delta left on the model
    assert all(p.requires_grad == flags[n] for n, p in model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match="unloaded"):
        sparse.unmerge()
    with pytest.raises(RuntimeError, match="unloaded"):
        sparse(**random_batches(1)[0])


def test_nonfinite_delta_never_reaches_the_weights():
    """A plain torch optimizer stepping on a NaN gradient poisons its delta; the write-back refuses it, loudly."""
    model, sel = setup()
    sparse = SparseModel(model, sel)
    opt = torch.optim.SGD(sparse.parameters(), lr=1.0)
    sparse(**random_batches(1)[0]).loss.backward()
    next(iter(sparse.parameters())).grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        opt.step()  # the write-back after the step refuses the poisoned delta
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        sparse(**random_batches(1)[0])  # and so does the next forward
    assert all(
        bool(torch.isfinite(p).all()) for p in model.parameters() if p.dtype.is_floating_point and not p.requires_grad
    )


# ------------------------------------------------------------------------------------------------ bad input
def test_sparse_model_bad_inputs():
    model, sel = setup()
    empty = Selection({}, sel.shapes, sel.config)
    with pytest.raises(ValueError, match="selection is empty"):
        SparseModel(model, empty)
    with pytest.raises(TypeError, match="gallop.Selection"):
        SparseModel(model, dict(sel))
    with pytest.raises(ValueError, match="not a parameter of this model"):
        SparseModel(tiny("gpt2"), sel)
    name = next(iter(sel))
    bad = Selection({name: torch.tensor([5, 3], dtype=torch.int32)}, sel.shapes, sel.config)
    with pytest.raises(ValueError, match="sorted unique indices"):
        SparseModel(model, bad)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # untouched


def test_repr_and_counts():
    model, sel = setup()
    sparse = SparseModel(model, sel)
    assert sparse.num_selected == sel.num_selected
    assert sparse.target_names == list(sel)
    assert float(sparse.grad_norm()) == 0.0


def test_random_scorer_on_gpt2_trains():
    model = tiny("gpt2")
    sel = select(model, None, GallopConfig(density=0.05, scorer="random"))
    sparse = SparseModel(model, sel)
    before = snapshot(model)
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(2))
    changed = changed_entries(model, before)
    assert 0 < changed <= sel.num_selected


def test_a_selection_with_strided_indices_trains_the_same_entries():
    """Issue 20: a Selection whose index tensors are views with strides (a user slicing a saved selection, say) was
    accepted, and on the Triton path only about half of its entries trained, from the wrong base values."""
    m1, sel = setup()
    m2 = tiny("llama", seed=0)  # setup's model, again
    s1 = SparseModel(m1, sel)
    strided = {}
    for name, idx in sel.items():
        wide = torch.zeros(2 * idx.numel(), dtype=idx.dtype)
        wide[::2] = idx
        strided[name] = wide[::2]
        assert not strided[name].is_contiguous() or idx.numel() < 2
    s2 = SparseModel(m2, Selection(strided, sel.shapes, sel.config))
    before = snapshot(m2)
    batches = random_batches(3)
    for s in (s1, s2):
        train(s, SparseAdamW(s, lr=1e-2), batches)
    assert changed_entries(m2, before) > sel.num_selected // 2
    for (n, a), b in zip(weights(m1).items(), weights(m2).values()):
        assert torch.equal(a, b), n
