"""Phase 1 on models: eligibility, mean_gradients, select, the built-in tasks."""

import pytest
import torch

from gallop import GallopConfig, eligible_parameters, mean_gradients, select
from gallop.tasks import TASKS, load_jsonl, task_examples

from .models import random_batches, tiny


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), True])
def test_config_density_range(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        GallopConfig(density=density)


def test_config_other_errors():
    with pytest.raises(ValueError, match="scorer must be one of"):
        GallopConfig(scorer="fisher")
    with pytest.raises(ValueError, match="budget must be one of"):
        GallopConfig(budget="layer")
    with pytest.raises(TypeError, match="target_modules must be"):
        GallopConfig(target_modules=[1, 2])
    assert GallopConfig.from_dict(GallopConfig(density=0.5).to_dict()) == GallopConfig(density=0.5)


# ------------------------------------------------------------------------------------------------ eligibility
def test_default_targets_are_linear_weights_without_head():
    model = tiny("llama")
    names = list(eligible_parameters(model))
    assert "lm_head.weight" not in names
    assert all(n.endswith("proj.weight") for n in names)
    assert len(names) == 2 * 7


def test_tied_head_excluded():
    model = tiny("llama_tied")
    names = list(eligible_parameters(model))
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names


def test_gpt2_conv1d_targets():
    model = tiny("gpt2")
    names = list(eligible_parameters(model))
    assert any("c_attn" in n for n in names) and any("c_fc" in n for n in names)
    assert all("wte" not in n and "ln_" not in n for n in names)


def test_target_modules_suffixes_regex_and_exclude():
    model = tiny("llama")
    names = list(eligible_parameters(model, GallopConfig(target_modules=["q_proj", "v_proj"])))
    assert len(names) == 4 and all("q_proj" in n or "v_proj" in n for n in names)
    names = list(eligible_parameters(model, GallopConfig(target_modules=r".*layers\.0\..*")))
    assert names and all(".layers.0." in n for n in names)
    assert any("norm" in n for n in names)  # an explicit target may be any module with a weight
    names = list(eligible_parameters(model, GallopConfig(exclude_modules=["mlp.down_proj"])))
    assert len(names) == 2 * 6
    with pytest.raises(ValueError, match="no eligible weights"):
        eligible_parameters(model, GallopConfig(target_modules=["nonexistent"]))


# ------------------------------------------------------------------------------------------------ mean_gradients
def test_mean_gradients_equals_hand_computed_mean():
    model = tiny("llama")
    batches = random_batches(3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = mean_gradients(model, batches, progress=False)

    names = list(eligible_parameters(model))
    assert list(grads) == names
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for n in names:
            want[n] += dict(model.named_parameters())[n].grad
    model.zero_grad(set_to_none=True)
    for n in names:
        torch.testing.assert_close(grads[n], want[n] / 3, rtol=1e-5, atol=1e-8)
        assert grads[n].dtype == torch.float32
    # the model is untouched: weights, flags, grads, mode
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n]
    assert not model.training


def test_mean_gradients_bf16_model_accumulates_fp32():
    model = tiny("llama", dtype=torch.bfloat16)
    grads = mean_gradients(model, random_batches(2), progress=False)
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())


def test_mean_gradients_max_batches_and_custom_loss():
    model = tiny("llama")
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return m(**batch).logits.float().pow(2).mean()

    grads = mean_gradients(model, iter(random_batches(5)), loss_fn=loss_fn, max_batches=2, progress=False)
    assert len(calls) == 2 and all(torch.isfinite(g).all() for g in grads.values())


def test_mean_gradients_errors_restore_model():
    model = tiny("llama")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="batches is empty"):
        mean_gradients(model, [], progress=False)
    with pytest.raises(ValueError, match="max_batches must be"):
        mean_gradients(model, random_batches(1), max_batches=0, progress=False)

    def nan_loss(m, batch):
        return m(**batch).loss * float("nan")

    with pytest.raises(ValueError, match="loss of calibration batch 0 is nan"):
        mean_gradients(model, random_batches(1), loss_fn=nan_loss, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------------ select
@pytest.mark.parametrize("scorer", ["gallop", "gradient", "magnitude", "product", "random"])
def test_select_exact_k(scorer):
    model = tiny("llama")
    grads = mean_gradients(model, random_batches(2), progress=False)
    config = GallopConfig(density=0.05, scorer=scorer)
    sel = select(model, grads if config.uses_gradients else None, config)
    eligible = sum(p.numel() for p in eligible_parameters(model).values())
    assert sel.num_eligible == eligible
    assert sel.num_selected == round(0.05 * eligible)
    for name, idx in sel.items():
        assert torch.all(idx[1:] > idx[:-1])  # sorted, unique
        assert int(idx.max()) < dict(model.named_parameters())[name].numel()


def test_select_global_matches_kernel_on_concatenation():
    """The model-level selection is the kernel's global top-k over the eligible weights in order."""
    import gallop_kernels as gk

    model = tiny("llama")
    grads = mean_gradients(model, random_batches(2), progress=False)
    sel = select(model, grads, GallopConfig(density=0.1))
    params = eligible_parameters(model)
    want = gk.select_topk([grads[n] for n in params], [p.detach() for p in params.values()], sel.num_selected)
    for n, w in zip(params, want):
        assert torch.equal(sel.get(n, torch.empty(0, dtype=torch.int32)), w)


def test_select_per_tensor_budget():
    model = tiny("llama")
    grads = mean_gradients(model, random_batches(2), progress=False)
    sel = select(model, grads, GallopConfig(density=0.1, budget="per_tensor"))
    for n, p in eligible_parameters(model).items():
        assert sel[n].numel() == round(0.1 * p.numel())


def test_select_reports_and_overlap():
    model = tiny("llama")
    grads = mean_gradients(model, random_batches(2), progress=False)
    a = select(model, grads, GallopConfig(density=0.1))
    assert a.overlap(a) == 1.0
    by_module = a.fraction_by("module")
    assert sum(s for s, _ in by_module.values()) == a.num_selected
    assert set(a.fraction_by("layer")) == {"0", "1"}
    assert "of" in repr(a) and "gallop" in repr(a)


def test_select_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="needs gradients"):
        select(model, None, GallopConfig())
    grads = mean_gradients(model, random_batches(1), progress=False)
    first = next(iter(grads))
    partial = {k: v for k, v in grads.items() if k != first}
    with pytest.raises(ValueError, match="grads lacks 1 eligible weights"):
        select(model, partial, GallopConfig())
    bad = dict(grads)
    bad[first] = bad[first].reshape(-1)
    with pytest.raises(ValueError, match="has shape"):
        select(model, bad, GallopConfig())
    with pytest.raises(ValueError, match="selects 0 of the"):
        select(model, grads, GallopConfig(density=1e-9))
    # magnitude and random need no gradients
    assert select(model, None, GallopConfig(scorer="magnitude")).num_selected > 0


# ------------------------------------------------------------------------------------------------ tasks
@pytest.mark.parametrize("name", TASKS)
def test_tasks_deterministic_and_disjoint(name):
    a = task_examples(name, "train", 40)
    assert a == task_examples(name, "train", 40)
    test = task_examples(name, "test", 40)
    assert not {e.prompt for e in a} & {e.prompt for e in test}
    assert all(0 <= e.label < len(e.choices) for e in a + test)
    assert len({e.label for e in a}) > 1  # the right answer is not always in one place


def test_task_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        task_examples("trivia")
    with pytest.raises(ValueError, match="split must be"):
        task_examples("parity", "dev")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="needs 'answer'"):
        load_jsonl(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "2+2=", "answer": "4"}\n{"prompt": "Pick", "choices": ["a", "b"], "label": 1}\n')
    ex = load_jsonl(good)
    assert ex[0].answer == "4" and ex[1].answer == "b"
