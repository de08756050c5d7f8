"""Misuse raises, failed loads change nothing, damaged or odd configs and adapters give a ValueError that names the
file, the key and the fix (the catalogue in docs/reliability.md)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gallop import GallopConfig, SparseAdamW, SparseModel, select
from gallop.adapters import ADAPTER_WEIGHTS, _data_sha256, read_adapter

from ..models import random_batches, tiny
from .helpers import setup, train


def _model_state(model):
    """Everything a failed load must leave as it was: weights, flags, grads, forwards, hooks."""
    return (
        {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        [("forward" in m.__dict__, len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
        [n for n, _ in model.named_buffers()],
    )


def _same_state(a, b) -> bool:
    (pa, fa, ba), (pb, fb, bb) = a, b
    return (
        pa.keys() == pb.keys()
        and all(torch.equal(pa[n][0], pb[n][0]) and pa[n][1:] == pb[n][1:] for n in pa)
        and fa == fb
        and ba == bb
    )


# ------------------------------------------------------------------------------------------------ config
def test_config_accepts_numpy_and_tensor_scalars():
    cfg = GallopConfig(density=np.float32(0.25), eps=torch.tensor(1e-6), seed=np.int64(3), num_selected=None)
    assert isinstance(cfg.density, float) and cfg.density == pytest.approx(0.25) and cfg.seed == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target_modules": "q_proj("}, ValueError, "not a valid regular expression"),
        ({"density": "0.1"}, ValueError, "density must be a finite real number"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"num_selected": 0}, ValueError, "num_selected must be >= 1"),
        ({"num_selected": 5, "budget": "per_tensor"}, ValueError, "num_selected fixes the global budget"),
    ],
)
def test_config_errors_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        GallopConfig(**kwargs)


def test_config_from_dict_rejects_a_list():
    with pytest.raises(ValueError, match="JSON object"):
        GallopConfig.from_dict([0.01, "gallop"])


def test_budget_larger_than_the_model():
    model = tiny("llama")
    with pytest.raises(ValueError, match="more than the .* eligible entries"):
        select(model, None, GallopConfig(scorer="random", num_selected=10**9))


# ------------------------------------------------------------------------------------------------ misuse
def test_double_wrapping_raises_and_changes_nothing():
    model, sel = setup()
    SparseModel(model, sel)
    before = _model_state(model)
    with pytest.raises(ValueError, match="already wrapped"):
        SparseModel(model, sel)
    assert _same_state(before, _model_state(model))


def test_an_unloaded_wrapper_refuses_every_use(tmp_path):
    model, sel = setup()
    sparse = SparseModel(model, sel)
    opt = SparseAdamW(sparse, lr=1e-2)
    plain = sparse.merge_and_unload()
    weights = {n: p.detach().clone() for n, p in plain.named_parameters()}
    for call in (
        lambda: sparse(**random_batches(1)[0]),
        sparse.merge,
        sparse.unmerge,
        sparse.merge_and_unload,
        lambda: sparse.save_pretrained(tmp_path / "a"),
        sparse.write_back,
        sparse.export_state,
    ):
        with pytest.raises(RuntimeError, match="unloaded"):
            call()
    for p in sparse.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the optimizer may still step its orphaned deltas, but the plain model is not written any more
    assert all(torch.equal(p, weights[n]) for n, p in plain.named_parameters())


def test_training_while_unmerged_raises_but_evaluation_works():
    model, sel = setup()
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(2))
    sparse.unmerge()
    sparse.train()
    with pytest.raises(RuntimeError, match="unmerged"):
        sparse(**random_batches(1)[0])
    sparse.eval()
    with torch.no_grad():
        sparse(**random_batches(1)[0])  # evaluating the pretrained weights is fine
    sparse.merge()
    sparse.train()
    sparse(**random_batches(1)[0]).loss.backward()


# ------------------------------------------------------------------------------------------------ adapters
def _rewrite(path, mutate):
    """Rewrite an adapter file with its embedded config changed by ``mutate`` (checksum recomputed: the damage is
    consistent, so only the loader's own checks can catch it)."""
    from gallop.adapters import _load_safetensors

    meta, data = _load_safetensors(path)
    config = json.loads(meta["gallop_adapter_config"])
    config, data = mutate(config, data)
    if isinstance(config, dict):
        config["data_sha256"] = _data_sha256(data)
    save_file(data, str(path), metadata={"format": "pt", "gallop_adapter_config": json.dumps(config)})


def _saved(tmp_path):
    model, sel = setup()
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(2))
    sparse.save_pretrained(tmp_path / "a")
    return tmp_path / "a" / ADAPTER_WEIGHTS


def _drop(key):
    def mutate(config, data):
        del config[key]
        return config, data

    return mutate


def _short_values(config, data):
    name = next(iter(config["tensors"]))
    data[f"{name}.values"] = data[f"{name}.values"][:-1].clone()
    return config, data


def _bad_dtype(config, data):
    config["tensors"][next(iter(config["tensors"]))]["dtype"] = "int8"
    return config, data


@pytest.mark.parametrize(
    "mutate, match",
    [
        (_drop("base_fingerprint"), "lacks the key 'base_fingerprint'"),
        (_drop("tensors"), "lacks the key 'tensors'"),
        (lambda c, d: ([c], d), "must be a JSON object, got a list"),
        (_short_values, "should have .* entries but its tensors disagree"),
        (_bad_dtype, "unsupported dtype 'int8'"),
        (lambda c, d: ({**c, "format_version": 99}, d), "format version 99 is not supported"),
    ],
)
def test_damaged_adapters_fail_before_the_model_is_touched(tmp_path, mutate, match):
    path = _saved(tmp_path)
    _rewrite(path, mutate)
    fresh = tiny("llama")
    before = _model_state(fresh)
    with pytest.raises(ValueError, match=match) as info:
        SparseModel.from_pretrained(fresh, path.parent)
    assert str(path) in str(info.value) or "format version" in str(info.value)
    assert _same_state(before, _model_state(fresh))


def test_a_bit_flip_in_the_header_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[20] ^= 0x80  # inside the JSON header
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="damaged"):
        read_adapter(path.parent)


def test_write_refuses_values_that_do_not_match_the_indices(tmp_path):
    from gallop.adapters import AdapterTensor, write_adapter

    bad = AdapterTensor("w", (4,), torch.float32, torch.tensor([0, 2]), torch.ones(3))
    with pytest.raises(ValueError, match="2 indices but 3 values"):
        write_adapter(tmp_path / "a", [bad], {"gallop_config": {}, "base_fingerprint": "x"})
    assert not (tmp_path / "a" / ADAPTER_WEIGHTS).exists()


def test_a_state_dict_from_another_selection_is_refused():
    m1, s1 = setup()
    m2, s2 = setup(scorer="random")
    a, b = SparseModel(m1, s1), SparseModel(m2, s2)
    with pytest.raises(ValueError, match="another GaLLoP selection"):
        b.load_state_dict(a.state_dict(), strict=False)
