"""Eligibility (which weights) and select (the Selection) on tiny models, from dense mean gradients or from the
candidates of a calibration in slices."""

import re

import pytest
import torch

from gallop import GallopConfig, eligible_parameters, mean_gradients, select

from ..models import random_batches, tiny


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
        assert sel[n].numel() == int(0.1 * p.numel())


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


# ------------------------------------------------------------------------------------------------ candidates
def test_select_from_candidates_of_a_sliced_calibration():
    """The candidates serve any config with the same scorer, eps, budget and eligible weights asking for no more
    entries (exactly the dense selection), and refuse every other config, naming the difference."""
    model = tiny("llama")
    config = GallopConfig(density=0.05)
    batches = random_batches(2)
    dense = mean_gradients(model, batches, config, progress=False)
    candidates = mean_gradients(model, batches, config, slices=3, progress=False)
    assert candidates.num_candidates == select(model, dense, config).num_selected
    assert candidates.nbytes == 8 * candidates.num_candidates  # int32 index + fp32 value
    for fewer in (GallopConfig(density=0.01), GallopConfig(num_selected=7)):
        want, got = select(model, dense, fewer), select(model, candidates, fewer)
        assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    bad = [
        (GallopConfig(density=0.05, scorer="gradient"), "made for scorer='gallop', but config has scorer='gradient'"),
        (GallopConfig(density=0.05, eps=1e-6), "made for eps=1e-08"),
        (GallopConfig(density=0.05, budget="per_tensor"), "made for budget='global'"),
        (GallopConfig(density=0.1), "kept only the top 922"),
        (GallopConfig(density=0.05, exclude_modules=["down_proj"]), "over other eligible weights"),
    ]
    for cfg, match in bad:
        with pytest.raises(ValueError, match=re.escape(match)):
            select(model, candidates, cfg)
    per_tensor = GallopConfig(density=0.05, budget="per_tensor")
    candidates = mean_gradients(model, batches, per_tensor, slices=2, progress=False)
    with pytest.raises(ValueError, match="ask for density <= 0.05"):
        select(model, candidates, GallopConfig(density=0.1, budget="per_tensor"))
