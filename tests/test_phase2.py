"""Phase 2: SparseModel, SparseAdamW, save/load, merge/unmerge, on tiny random Hugging Face models."""

import copy
import json

import pytest
import torch

from gallop import GallopConfig, SparseAdamW, SparseModel, mean_gradients, select
from gallop.io import decode_gaps, encode_gaps
from gallop.selection import Selection

from .models import random_batches, tiny


def _setup(arch="llama", density=0.05, dtype=torch.float32, scorer="gallop", seed=0):
    model = tiny(arch, dtype=dtype, seed=seed)
    config = GallopConfig(density=density, scorer=scorer)
    grads = mean_gradients(model, random_batches(2), config, progress=False) if config.uses_gradients else None
    return model, select(model, grads, config)


def _twins(**kw):
    """Two identical tiny models wrapped with one selection: (sparse_1, model_1, sparse_2, model_2)."""
    m1, sel = _setup(**kw)
    m2 = tiny(kw.get("arch", "llama"), dtype=kw.get("dtype", torch.float32), seed=kw.get("seed", 0))
    return SparseModel(m1, sel), m1, SparseModel(m2, sel), m2


def _train(sparse, opt, batches, accumulate=1):
    for b in batches:
        for part in _split(b, accumulate):
            (sparse(**part).loss / accumulate).backward()
        opt.step()
        opt.zero_grad()


def _split(batch, n):
    if n == 1:
        return [batch]
    return [{k: v.chunk(n)[i] for k, v in batch.items()} for i in range(n)]


def test_density_one_equals_dense_adamw():
    """At density 1.0, sparse training is dense AdamW on the eligible weights (20 steps, fp32)."""
    model, sel = _setup(density=1.0)
    dense = copy.deepcopy(model)
    sparse = SparseModel(model, sel)
    opt = SparseAdamW(sparse, lr=1e-3)
    names = list(sel)
    params = dict(dense.named_parameters())
    for p in dense.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    dense_opt = torch.optim.AdamW([params[n] for n in names], lr=1e-3, weight_decay=0.0, foreach=False)
    batches = random_batches(20, seed=3)
    _train(sparse, opt, batches)
    for b in batches:
        dense(**b).loss.backward()
        dense_opt.step()
        dense_opt.zero_grad()
    for (n, a), (_, b) in zip(model.named_parameters(), dense.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=n)


def test_unselected_weights_bit_identical_and_selected_move():
    model, sel = _setup(density=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = SparseModel(model, sel)
    _train(sparse, SparseAdamW(sparse, lr=1e-2, weight_decay=0.1), random_batches(5, seed=1))
    moved = 0
    for n, p in model.named_parameters():
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        if n in sel:
            mask[sel[n].long()] = True
        assert torch.equal(p.detach().view(-1)[~mask], before[n].view(-1)[~mask]), n
        moved += int((p.detach().view(-1)[mask] != before[n].view(-1)[mask]).sum())
    assert moved > 0.9 * sel.num_selected


def test_no_gradient_for_unselected_tensors():
    model, sel = _setup(density=0.05)
    sparse = SparseModel(model, sel)
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in sel)
    sparse(**random_batches(1)[0]).loss.backward()
    assert all(p.grad is None for p in model.parameters())  # dense grads freed by the hooks
    assert sparse.delta.grad is not None and sparse.delta.grad.shape == (sel.num_selected,)


def test_merge_unmerge_exact_and_unload():
    model, sel = _setup()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sparse = SparseModel(model, sel)
    _train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(3))
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse.unmerge()
    assert not sparse.merged
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    sparse.merge()
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    plain = sparse.merge_and_unload()
    assert plain is model
    assert all(p.requires_grad == flags[n] for n, p in model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="unloaded"):
        sparse.unmerge()


def test_any_torch_optimizer_matches_sparse_adamw():
    s1, m1, s2, m2 = _twins()
    batches = random_batches(6, seed=2)
    _train(s1, SparseAdamW(s1, lr=1e-2, weight_decay=0.05), batches)
    _train(s2, torch.optim.AdamW(s2.parameters(), lr=1e-2, weight_decay=0.05, foreach=False), batches)
    s2.sync()  # torch's optimizer does not write back; the next forward (or sync) does
    torch.testing.assert_close(s1.delta, s2.delta, rtol=1e-5, atol=1e-7)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)


def test_write_back_triggered_by_version_counter():
    model, sel = _setup()
    sparse = SparseModel(model, sel)
    name = next(iter(sel))
    w = dict(model.named_parameters())[name]
    with torch.no_grad():
        sparse.delta.add_(1.0)  # any in-place change of the delta
    assert not torch.equal(w.detach().view(-1)[sel[name].long()],
                           sparse.base[: sel[name].numel()] + 1.0)  # not written yet
    model.state_dict()  # reading the weights writes back first
    torch.testing.assert_close(w.detach().view(-1)[sel[name].long()], sparse.base[: sel[name].numel()] + 1.0)


def test_gradient_accumulation_equals_big_batch():
    s1, m1, s2, m2 = _twins()
    batches = random_batches(4, batch=4, seed=5)
    o1 = SparseAdamW(s1, lr=1e-2, max_grad_norm=0.5)
    o2 = SparseAdamW(s2, lr=1e-2, max_grad_norm=0.5)
    _train(s1, o1, batches, accumulate=1)
    _train(s2, o2, batches, accumulate=2)
    torch.testing.assert_close(s1.delta, s2.delta, rtol=1e-4, atol=1e-6)


def test_step_in_backward_equals_default_mode():
    s1, m1, s2, m2 = _twins()
    batches = random_batches(5, seed=7)
    _train(s1, SparseAdamW(s1, lr=1e-2, weight_decay=0.1), batches)
    o2 = SparseAdamW(s2, lr=1e-2, weight_decay=0.1, step_in_backward=True)
    _train(s2, o2, batches)
    torch.testing.assert_close(s1.delta, s2.delta, rtol=1e-5, atol=1e-7)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)
    assert o2.state[s2.delta]["step"] == 5


def test_lr_scheduler_and_optimizer_state_dict():
    model, sel = _setup()
    sparse = SparseModel(model, sel)
    opt = SparseAdamW(sparse, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(sparse, opt, random_batches(2))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    state = copy.deepcopy(opt.state_dict())
    opt2 = SparseAdamW(sparse, lr=1.0)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert torch.equal(opt2.state[sparse.delta]["exp_avg"], opt.state[sparse.delta]["exp_avg"])


def test_bf16_model_moves_at_small_lr():
    """fp32 master deltas accumulate updates a bf16 weight could not absorb on its own."""
    model, sel = _setup(dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = SparseModel(model, sel)
    _train(sparse, SparseAdamW(sparse, lr=1e-5), random_batches(40, seed=4))
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert moved > 0
    for i, (n, p) in enumerate(zip(sparse._names, sparse._params)):
        want = (sparse._slice(sparse.base, i) + sparse._slice(sparse.delta.detach(), i)).to(torch.bfloat16)
        assert torch.equal(p.detach().view(-1)[sparse._indices[i].long()], want)


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen2", "gpt2"])
def test_architectures(arch):
    model, sel = _setup(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = SparseModel(model, sel)
    losses = []
    opt = SparseAdamW(sparse, lr=1e-2)
    for b in random_batches(4, seed=9):
        loss = sparse(**b).loss
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert 0 < changed <= sel.num_selected


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("gaps", [[0], [5], [0, 1, 2], [70000], [65535, 65536, 131071, 131072, 10**9]])
def test_gap_code_round_trip(gaps):
    idx = torch.tensor(gaps, dtype=torch.int64)
    code = encode_gaps(idx)
    assert code.dtype == torch.int16
    assert torch.equal(decode_gaps(code), idx)


def test_gap_code_random_and_empty():
    gen = torch.Generator().manual_seed(0)
    idx = torch.sort(torch.randperm(10**6, generator=gen)[:10**4]).values
    assert torch.equal(decode_gaps(encode_gaps(idx)), idx)
    assert decode_gaps(encode_gaps(torch.empty(0, dtype=torch.int64))).numel() == 0
    with pytest.raises(ValueError, match="sorted, unique"):
        encode_gaps(torch.tensor([3, 3]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_save_load_round_trip(tmp_path, precision):
    model, sel = _setup()
    sparse = SparseModel(model, sel)
    _train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(3))
    sparse.save_pretrained(tmp_path / "a", precision=precision)
    fresh = tiny("llama")
    loaded = SparseModel.from_pretrained(fresh, tmp_path / "a")
    assert loaded.num_selected == sparse.num_selected
    assert all(torch.equal(loaded.selection[n].long(), sel[n].long()) for n in sel)
    if precision == "fp32":
        assert torch.equal(loaded.delta, sparse.delta)
        for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
            assert torch.equal(a, b), n
    else:
        assert torch.equal(loaded.delta, sparse.delta.detach().to(torch.bfloat16).float())
    cfg = json.loads((tmp_path / "a" / "gallop_config.json").read_text())
    assert cfg["gallop_config"]["density"] == 0.05 and cfg["num_selected"] == sel.num_selected


def test_adapter_size_at_one_percent(tmp_path):
    """bf16 adapters take <= 4.5 bytes per selected entry (gap-coded uint16 indices + bf16 values)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    sel = select(model, None, GallopConfig(density=0.01, scorer="random"))
    sparse = SparseModel(model, sel)
    sparse.save_pretrained(tmp_path / "a")
    size = (tmp_path / "a" / "gallop_adapter.safetensors").stat().st_size
    assert size / sparse.num_selected <= 4.5, size / sparse.num_selected


def test_load_onto_wrong_base_fails_and_leaves_model_untouched(tmp_path):
    model, sel = _setup()
    sparse = SparseModel(model, sel)
    _train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(2))
    sparse.save_pretrained(tmp_path / "a")
    other = tiny("llama", seed=1)  # same architecture, other weights
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="wrong base model"):
        SparseModel.from_pretrained(other, tmp_path / "a")
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in other.named_parameters())
    with pytest.raises(ValueError, match="already merged"):
        SparseModel.from_pretrained(model, tmp_path / "a")  # the trained model has the delta merged
    with pytest.raises(ValueError, match="does not have"):
        SparseModel.from_pretrained(tiny("gpt2"), tmp_path / "a")


def test_damaged_or_missing_adapter(tmp_path):
    model, sel = _setup()
    sparse = SparseModel(model, sel)
    with pytest.raises(FileNotFoundError, match="not a gallop adapter folder"):
        SparseModel.from_pretrained(tiny("llama"), tmp_path / "missing")
    sparse.save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "gallop_adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its config"):
        SparseModel.from_pretrained(tiny("llama"), tmp_path / "a")
    with pytest.raises(ValueError, match="precision must be"):
        sparse.save_pretrained(tmp_path / "b", precision="int8")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    """A save that fails midway leaves the previous adapter intact and no temporary files."""
    model, sel = _setup()
    sparse = SparseModel(model, sel)
    sparse.save_pretrained(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    import gallop.io as gio

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(gio, "save_file", boom)
    with torch.no_grad():
        sparse.delta.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        sparse.save_pretrained(tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


# ------------------------------------------------------------------------------------------------ bad input
def test_sparse_model_bad_inputs():
    model, sel = _setup()
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
    assert all(p.grad is None for p in model.parameters())


def test_sparse_adamw_bad_inputs():
    model, sel = _setup()
    sparse = SparseModel(model, sel)
    with pytest.raises(ValueError, match="lr must be"):
        SparseAdamW(sparse, lr=-1)
    with pytest.raises(ValueError, match="betas must be"):
        SparseAdamW(sparse, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="needs the SparseModel"):
        SparseAdamW(sparse.parameters(), step_in_backward=True)
    with pytest.raises(ValueError, match="cannot clip"):
        SparseAdamW(sparse, step_in_backward=True, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="contiguous fp32"):
        SparseAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])


def test_repr_and_counts():
    model, sel = _setup()
    sparse = SparseModel(model, sel)
    assert sparse.num_selected == sel.num_selected
    assert "trainable" in repr(sparse) and "merged" in repr(sparse)
    assert list(sparse.parameters()) == [sparse.delta]


@pytest.mark.parametrize("optimizer", ["sparse_adamw", "torch_adamw"])
def test_compiled_forward_matches_eager(optimizer):
    """torch.compile(model) trains the same; the write-back hook stays out of the graph (no recompiles)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    s1, m1, s2, m2 = _twins()

    def make(sp):
        if optimizer == "sparse_adamw":
            return SparseAdamW(sp, lr=1e-2)
        return torch.optim.AdamW(sp.parameters(), lr=1e-2, foreach=False)

    batches = random_batches(4, seed=3)
    _train(s1, make(s1), batches)
    compiled = torch.compile(m2, backend="aot_eager")
    opt = make(s2)
    for b in batches:
        compiled(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    s1.sync()
    s2.sync()
    assert torch.equal(s1.delta, s2.delta)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
