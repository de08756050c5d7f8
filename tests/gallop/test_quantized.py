"""gallop.quantized: QGaLLoP over a bitsandbytes nf4 / int8 base, calibrated, selected, trained, saved, reloaded,
merged and refused, on a tiny Llama (skipped when bitsandbytes is not installed)."""

import copy

import pytest
import torch

from gallop import GallopConfig, SparseAdamW, SparseModel, mean_gradients, quantized, select
from gallop.models import ModelArguments, load_model

from ..models import random_batches, tiny
from .helpers import enable_checkpointing

pytest.importorskip("bitsandbytes")

KINDS = ["nf4", "int8"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny("llama").save_pretrained(folder)
    return folder


def load(folder, kind, dtype=torch.float32):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantized.bnb_config(kind), device_map="cpu", dtype=dtype
    )
    return model.eval()


def dense_twin(model):
    """A copy of ``model`` whose quantized layers are nn.Linear holding the de-quantized weights."""
    return quantized.dequantize_model(copy.deepcopy(model))


def storage(model):
    """Every tensor of the model's own state (the quantized bytes and their scales included), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def qtol(dtype=torch.float32):
    """Tolerance for two fp32 computations of one product in a different association order (a tiny model)."""
    eps = torch.finfo(dtype).eps
    return dict(rtol=256 * eps, atol=256 * eps)


def selected(model, density=0.05):
    cfg = GallopConfig(density=density)
    grads = mean_gradients(model, random_batches(2), cfg, progress=False)
    return select(model, grads, cfg)


# ---------------------------------------------------------------------------------------------- refusals
def test_other_quantizations_are_refused_before_any_work():
    with pytest.raises(ValueError, match="nf4, int8"):
        load_model("no/such/model/anywhere", quantization="gptq")
    with pytest.raises(ValueError, match="nf4, int8"):
        quantized.check_quantization("fp8")
    model = tiny("llama")

    class _Config:
        quant_method = "awq"

    class _Quantizer:
        quantization_config = _Config()

    model.hf_quantizer = _Quantizer()
    with pytest.raises(ValueError, match="'awq'.*bitsandbytes 4-bit"):
        select(model, None, GallopConfig(scorer="random"))
    assert ModelArguments(quantization="nf4").quantization == "nf4"


def test_dequantize_model_matches_the_dtype_of_the_rest_of_the_model(base_folder):
    """An int8 model whose other weights are fp16 (what transformers 4.56 loads without a dtype) de-quantizes its
    layers to fp16, not to the fp32 of the row scales, so the merged model runs (it raised a dtype mismatch)."""
    model = load(base_folder, "int8", dtype=torch.float16)
    merged = quantized.dequantize_model(copy.deepcopy(model))
    assert {p.dtype for p in merged.parameters()} == {torch.float16}
    ids = torch.tensor([[1, 2, 3]])
    assert merged(input_ids=ids).logits.dtype == torch.float16


# ---------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("kind", KINDS)
def test_mean_gradient_is_taken_wrt_the_dequantized_weights(base_folder, kind):
    model = load(base_folder, kind)
    assert quantized.quantization_of(model) == kind
    twin = dense_twin(model)
    before, flags = storage(model), [p.requires_grad for p in model.parameters()]
    cfg = GallopConfig(density=0.05)
    got = mean_gradients(model, random_batches(2), cfg, progress=False)
    want = mean_gradients(twin, random_batches(2), cfg, progress=False)
    assert list(got) == list(want)
    for name in got:
        assert got[name].shape == want[name].shape
        torch.testing.assert_close(got[name], want[name], **qtol())
    after = storage(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing written
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any("forward" in m.__dict__ for m in model.modules())  # the calibration forwards are gone
    # the score uses |deq(w)|: the selection equals the dense twin's on the same gradients
    sel, sel_twin = select(model, got, cfg), select(twin, got, cfg)
    assert list(sel) == list(sel_twin) and all(torch.equal(sel[n], sel_twin[n]) for n in sel)


@pytest.mark.parametrize("kind", KINDS)
def test_calibration_in_slices_on_a_quantized_base_selects_exactly_the_one_pass_set(base_folder, kind):
    """The running top-k between slices scores |deq(w)| as the one-pass select does (and de-quantizes one layer
    at a time), so S = 2 and 7 pick bit-identical selections; the candidates' mean gradients are the one pass's."""
    model = load(base_folder, kind)
    before = storage(model)
    cfg = GallopConfig(density=0.05)
    batches = random_batches(2)
    dense = mean_gradients(model, batches, cfg, progress=False)
    want = select(model, dense, cfg)
    for slices in (2, 7):
        candidates = mean_gradients(model, batches, cfg, progress=False, slices=slices)
        assert dict(candidates.shapes) == {n: tuple(g.shape) for n, g in dense.items()}
        got = select(model, candidates, cfg)
        assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want), slices
        for n in want:
            at = candidates.indices[n].long()
            assert torch.equal(candidates.values[n], dense[n].reshape(-1)[at]), n
    after = storage(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_only_the_deltas_and_matches_the_dense_twin(base_folder, kind):
    model = load(base_folder, kind)
    sel = selected(model)
    twin = dense_twin(model)
    before = storage(model)
    sparse, sparse_twin = SparseModel(model, sel), SparseModel(twin, sel)
    assert [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith("gallop_delta")] == []
    batch = random_batches(1, batch=4, seed=3)[0]
    out, out_twin = sparse(**batch), sparse_twin(**batch)
    torch.testing.assert_close(out.logits, out_twin.logits, **qtol())
    out.loss.backward()
    out_twin.loss.backward()
    for d, d_twin in zip(sparse.parameters(), sparse_twin.parameters()):
        torch.testing.assert_close(d.grad, d_twin.grad, **qtol())
    sparse.zero_grad()
    opt = SparseAdamW(sparse, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = sparse(**batch).loss
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    after = storage(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the quantized storage and all else unchanged
    assert all(p.grad is None for p in model.parameters() if not p.is_floating_point())


def test_checkpointing_and_bf16_autocast_train_as_on_a_dense_base(base_folder):
    model = load(base_folder, "nf4")
    sel = selected(model)
    batch = random_batches(1, batch=4, seed=3)[0]
    plain = SparseModel(model, sel)
    plain.train()
    plain(**batch).loss.backward()
    want = [d.grad.clone() for d in plain.parameters()]
    plain.zero_grad()
    enable_checkpointing(model, reentrant=True)
    plain(**batch).loss.backward()
    for d, w in zip(plain.parameters(), want):
        torch.testing.assert_close(d.grad, w, **qtol())
    plain.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = plain(**batch).loss
    loss.backward()
    eps = torch.finfo(torch.bfloat16).eps
    grads = torch.cat([d.grad for d in plain.parameters()])
    assert torch.isfinite(grads).all()
    torch.testing.assert_close(grads, torch.cat(want), rtol=0, atol=64 * eps * float(torch.cat(want).abs().max()))


def test_a_plain_trainer_trains_the_deltas(base_folder, tmp_path):
    import transformers as tf

    model = load(base_folder, "nf4")
    sparse = SparseModel(model, selected(model))
    before = storage(model)
    rows = [{k: v[i] for k, v in b.items()} for b in random_batches(2, batch=4, seed=4) for i in range(4)]
    args = tf.TrainingArguments(
        tmp_path / "out", per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True
    )
    tf.Trainer(model=sparse, args=args, train_dataset=rows).train()
    assert any(bool(d.detach().abs().sum() > 0) for d in sparse.parameters())
    after = storage(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------- adapters
def _trained(folder, kind, steps=3):
    model = load(folder, kind)
    sparse = SparseModel(model, selected(model))
    opt = SparseAdamW(sparse, lr=1e-2)
    for batch in random_batches(steps, seed=5):
        sparse(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, sparse


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_reloads_exactly_onto_the_same_quantized_base_and_merges(base_folder, tmp_path, kind):
    model, sparse = _trained(base_folder, kind)
    batch = random_batches(1, seed=6)[0]
    with torch.no_grad():
        want = sparse(**batch).logits
    sparse.save_pretrained(tmp_path / "adapter")
    import json

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["quantization"] == kind
    reloaded = SparseModel.from_pretrained(load(base_folder, kind), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, want)
    for a, b in zip(reloaded.parameters(), sparse.parameters()):
        assert torch.equal(a, b)  # the fp32 deltas themselves

    merged = sparse.merge_and_unload()
    assert quantized.quantization_of(merged) is None
    assert not any(quantized.is_quantized_linear(m) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want, **qtol())


def test_adapter_onto_the_dense_original_and_refusals(base_folder, tmp_path):
    model, sparse = _trained(base_folder, "nf4")
    sparse.save_pretrained(tmp_path / "nf4")
    deltas = {n: d.detach().clone() for n, d in sparse.named_deltas().items()}
    original = tiny("llama")
    pretrained = {n: p.detach().clone() for n, p in original.named_parameters()}
    onto = SparseModel.from_pretrained(original, tmp_path / "nf4")
    for name, delta in deltas.items():
        idx = sparse.selection[name].long()
        got = original.get_parameter(name).detach().reshape(-1)[idx]
        assert torch.equal(got, pretrained[name].reshape(-1)[idx] + delta)  # the delta added at the indices
    assert onto.num_selected == sparse.num_selected

    with pytest.raises(ValueError, match="trained on a nf4 base but this model is int8"):
        SparseModel.from_pretrained(load(base_folder, "int8"), tmp_path / "nf4")
    dense = tiny("llama")
    dense_sparse = SparseModel(dense, select(dense, None, GallopConfig(density=0.05, scorer="random")))
    dense_sparse.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"dense \(not quantized\) base but this model is nf4"):
        SparseModel.from_pretrained(load(base_folder, "nf4"), tmp_path / "dense")
    with pytest.raises(NotImplementedError, match="quantized base"):
        sparse.unmerge()


# ---------------------------------------------------------------------------------------------- DDP
WORLD = 2
DEADLINE_S = 300


def _ddp_worker(rank: int, world: int, store: str, folder: str, out: str) -> None:
    import gc
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = load(folder, "nf4")
        before = storage(model)
        cfg = GallopConfig(density=0.05)
        calib = random_batches(4, batch=2, seed=1)[rank::world]
        sel = select(model, mean_gradients(model, calib, cfg, progress=False), cfg)
        sparse = SparseModel(model, sel)
        ddp = torch.nn.parallel.DistributedDataParallel(sparse)
        opt = SparseAdamW(sparse, lr=1e-2)
        for batch in random_batches(3, batch=4, seed=2):
            ddp(**{k: v.chunk(world)[rank] for k, v in batch.items()}).loss.backward()
            opt.step()
            opt.zero_grad()
        after = storage(model)
        result = {
            "selection": {n: i.clone() for n, i in sel.items()},
            "deltas": [p.detach().clone() for p in sparse.parameters()],
            "untouched": all(torch.equal(before[k], after[k]) for k in before),
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        del ddp, opt, sparse
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_on_two_gloo_ranks_equals_one_process(base_folder, tmp_path):
    from .helpers import adam_tol, spawn_ranks

    spawn_ranks(_ddp_worker, (WORLD, str(tmp_path / "store"), str(base_folder), str(tmp_path)), WORLD, DEADLINE_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = load(base_folder, "nf4")
    cfg = GallopConfig(density=0.05)
    sel = select(model, mean_gradients(model, random_batches(4, batch=2, seed=1), cfg, progress=False), cfg)
    sparse = SparseModel(model, sel)
    opt = SparseAdamW(sparse, lr=1e-2)
    for batch in random_batches(3, batch=4, seed=2):
        sparse(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for r in ranks:
        assert list(r["selection"]) == list(sel) and all(torch.equal(r["selection"][n], sel[n]) for n in sel)
        assert r["untouched"]
        for a, b in zip(r["deltas"], sparse.parameters()):
            torch.testing.assert_close(a, b.detach(), **adam_tol(1e-2, 3))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["deltas"], ranks[1]["deltas"]))
