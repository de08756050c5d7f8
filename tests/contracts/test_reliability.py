"""Covers gallop.sparse, gallop.adapters (format, io), gallop.config, gallop.calibrate and gallop.optim.

Misuse raises, failed loads change nothing, damaged or odd configs and adapters give a ValueError that names the
file, the key and the fix (the catalogue in docs/reliability.md)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gallop import GallopConfig, SparseAdamW, SparseModel, select
from gallop.adapters import ADAPTER_WEIGHTS, read_adapter
from gallop.adapters.format import _data_sha256

from ..gallop.helpers import setup, train
from ..models import random_batches, tiny


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
        ({"density": "0.1"}, TypeError, "density must be a real number"),
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
    from gallop.adapters.format import _load_safetensors

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


# ------------------------------------------------------------------------------------------------ issue 20 (library)
@pytest.mark.parametrize("field", ["scorer", "budget"])
def test_a_list_where_a_name_is_expected_names_the_field(field):
    with pytest.raises(ValueError, match=f"{field} must be one of the strings"):
        GallopConfig(**{field: ["gallop"]})


def test_a_per_tensor_budget_of_zero_entries_fails_at_selection():
    model = tiny("llama")
    largest = max(p.numel() for n, p in model.named_parameters() if "proj" in n)
    with pytest.raises(ValueError, match=r"budget='per_tensor' selects floor\(density \* numel\) = 0"):
        select(model, None, GallopConfig(scorer="random", budget="per_tensor", density=0.5 / largest))


def test_mean_gradients_takes_numpy_integers_and_refuses_a_single_batch():
    from gallop import mean_gradients

    model = tiny("llama")
    batches = random_batches(2)
    grads = mean_gradients(model, batches, max_batches=np.int64(1), progress=False)
    first = mean_gradients(model, batches[:1], progress=False)
    assert grads.keys() == first.keys() and all(torch.equal(grads[n], first[n]) for n in grads)
    with pytest.raises(TypeError, match=r"batches must be an iterable of batches.*pass \[batch\]"):
        mean_gradients(model, batches[0], progress=False)
    with pytest.raises(TypeError, match="max_batches must be an int"):
        mean_gradients(model, batches, max_batches=np.float64(1.0), progress=False)


@pytest.mark.parametrize("route", ["load_state_dict", "load_deltas_"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_loading_a_non_finite_delta_is_refused_before_anything_is_copied(route, bad):
    model, sel = setup()
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(2))
    before_deltas = [p.detach().clone() for p in sparse.parameters()]
    before = _model_state(model)
    state = sparse.state_dict()
    key = next(k for k in state if k.startswith("deltas."))
    state[key][0] = bad
    with pytest.raises(ValueError, match="NaN or Inf for the delta of"):
        if route == "load_state_dict":
            sparse.load_state_dict(state)
        else:
            sparse.load_deltas_({k.removeprefix("deltas."): v for k, v in state.items() if k.startswith("deltas.")})
    assert all(torch.equal(a, p) for a, p in zip(before_deltas, sparse.parameters()))
    assert _same_state(before, _model_state(model))
    sparse(**random_batches(1)[0])  # the wrapper still works


def test_a_delta_that_overflows_an_fp16_weight_is_refused_on_load():
    model, sel = setup(dtype=torch.float16)
    sparse = SparseModel(model, sel)
    state = sparse.state_dict()
    key = next(k for k in state if k.startswith("deltas."))
    state[key][0] = 1e6  # finite in fp32, inf once cast to the fp16 weight
    with pytest.raises(ValueError, match="overflows its torch.float16 weight"):
        sparse.load_state_dict(state)


@pytest.mark.parametrize(
    "metrics, error, match",
    [
        ({"acc": float("nan")}, ValueError, r"metrics\['acc'\] is nan: the adapter config is strict JSON"),
        ({"acc": float("inf")}, ValueError, r"metrics\['acc'\] is inf"),
        ({"acc": np.float32("nan")}, ValueError, r"metrics\['acc'\] is nan"),
        ({"acc": [0.5]}, TypeError, r"metrics\['acc'\] is a list"),
        ({"acc": object()}, TypeError, r"metrics\['acc'\] is a object"),
        ([("acc", 0.5)], TypeError, "metrics must be a mapping"),
    ],
)
def test_adapter_metrics_are_strict_json_or_refused(tmp_path, metrics, error, match):
    model, sel = setup()
    sparse = SparseModel(model, sel)
    with pytest.raises(error, match=match):
        sparse.save_pretrained(tmp_path / "a", metrics=metrics)
    assert not (tmp_path / "a").exists()


def test_adapter_metrics_round_trip_as_strict_json(tmp_path):
    model, sel = setup()
    sparse = SparseModel(model, sel)
    sparse.save_pretrained(tmp_path / "a", metrics={"acc": np.float64(0.5), "n": np.int64(3), "t": torch.tensor(2.0)})
    text = (tmp_path / "a" / "adapter_config.json").read_text()
    config = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert config["metrics"] == {"acc": 0.5, "n": 3, "t": 2.0}


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_fp16", "submodule"])
def test_casting_the_wrapped_model_is_refused_and_changes_nothing(cast):
    model, sel = setup()
    sparse = SparseModel(model, sel)
    before = _model_state(model)
    deltas = [p.detach().clone() for p in sparse.parameters()]
    call = {
        "half": lambda: sparse.model.half(),
        "bfloat16": lambda: sparse.model.bfloat16(),
        "to_fp16": lambda: sparse.model.to(torch.float16),
        "submodule": lambda: sparse.model.model.layers[0].half(),
    }[cast]
    with pytest.raises(RuntimeError, match="keeps its weights' dtypes and fp32 deltas"):
        call()
    assert _same_state(before, _model_state(model))
    assert all(p.dtype == torch.float32 and torch.equal(a, p) for a, p in zip(deltas, sparse.parameters()))
    sparse.model.to("cpu")  # device moves still pass
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(1))
    plain = sparse.merge_and_unload()
    assert plain.half() is plain  # the plain model casts again


def test_transformers_save_pretrained_of_a_wrapped_model_writes_the_plain_merged_model(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, sel = setup()
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(2))
    assert not [k for k in model.state_dict() if "gallop" in k]
    model.save_pretrained(tmp_path / "m")
    keys = list(load_file(tmp_path / "m" / "model.safetensors"))
    assert not [k for k in keys if "gallop" in k]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    mine = model.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in reloaded.state_dict().items())  # the trained weights


@pytest.mark.parametrize("into", ["model", "submodule"])
def test_loading_weights_into_a_wrapped_model_is_refused_before_anything_changes(into):
    """Loaded weights would be out of step with the deltas (the next step writes cast(base + delta) over them)."""
    model, sel = setup()
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(1))
    target = model if into == "model" else model.model.layers[0]
    other = {k: torch.zeros_like(v) for k, v in target.state_dict().items()}
    before = _model_state(model)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="managed by a SparseModel"):
            target.load_state_dict(other, strict=strict)
        assert _same_state(before, _model_state(model))
    plain = sparse.merge_and_unload()
    plain.load_state_dict({k: v.clone() for k, v in plain.state_dict().items()})  # the plain model loads again


def test_load_model_on_a_folder_without_a_tokenizer_says_so(tmp_path):
    from gallop.models import load_model

    tiny("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer .*tokenizer.save_pretrained"):
        load_model(str(tmp_path / "m"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
