"""Adapter folders: PEFT's layout, bit-identical reload in the weight's dtype, verified and crash-safe writes."""

import hashlib
import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from gallop import GallopConfig, SparseAdamW, SparseModel, select
from gallop.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, decode_gaps, encode_gaps, read_adapter

from ..models import llama, random_batches, tiny
from .helpers import setup, snapshot, train, weights

pytestmark = pytest.mark.usefixtures("backend")


@pytest.mark.parametrize("gaps", [[0], [5], [0, 1, 2], [70000], [65535, 65536, 131071, 131072, 10**9]])
def test_gap_code_round_trip(gaps):
    idx = torch.tensor(gaps, dtype=torch.int64)
    code = encode_gaps(idx)
    assert code.dtype == torch.uint16
    assert torch.equal(decode_gaps(code), idx)


def test_gap_code_random_and_empty():
    gen = torch.Generator().manual_seed(0)
    idx = torch.sort(torch.randperm(10**6, generator=gen)[: 10**4]).values
    assert torch.equal(decode_gaps(encode_gaps(idx)), idx)
    assert decode_gaps(encode_gaps(torch.empty(0, dtype=torch.int64))).numel() == 0
    with pytest.raises(ValueError, match="sorted, unique"):
        encode_gaps(torch.tensor([3, 3]))


def _trained(dtype=torch.float32, lr=1e-2, steps=3):
    model, sel = setup(dtype=dtype)
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=lr), random_batches(steps))
    return model, sel, sparse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("save_deltas", [False, True])
def test_reload_reproduces_the_trained_weights_bit_for_bit(tmp_path, dtype, save_deltas):
    """The default adapter, loaded onto the pretrained model, gives the trained weights exactly (0.1 stored bf16
    deltas: every trained entry differed on fp32 models and 159 of 576 on bf16)."""
    model, sel, sparse = _trained(dtype, lr=1e-3)
    sparse.save_pretrained(tmp_path / "a", save_deltas=save_deltas)
    fresh = tiny("llama", dtype=dtype)
    loaded = SparseModel.from_pretrained(fresh, tmp_path / "a")
    for n, p in weights(model).items():
        assert torch.equal(weights(fresh)[n], p), n
    assert all(torch.equal(loaded.selection[n].long(), sel[n].long()) for n in sel)
    if save_deltas:
        for a, b in zip(loaded.parameters(), sparse.parameters()):
            assert torch.equal(a, b)
    # training continues from the loaded state: one more step moves both the same way
    more = random_batches(1, seed=12)
    train(sparse, SparseAdamW(sparse, lr=1e-3), more)
    train(loaded, SparseAdamW(loaded, lr=1e-3), more)
    assert all(bool(torch.isfinite(p).all()) for p in loaded.parameters())


def test_folder_layout_and_config(tmp_path):
    model, sel, sparse = _trained()
    sparse.save_pretrained(tmp_path / "a", metrics={"id_acc": 0.75})
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert cfg["adapter_type"] == "gallop" and cfg["format_version"] == 2
    assert cfg["gallop_config"]["density"] == 0.05 and cfg["num_selected"] == sel.num_selected
    assert cfg["metrics"] == {"id_acc": 0.75} and not cfg["has_deltas"]
    assert "GaLLoP adapter" in (tmp_path / "a" / "README.md").read_text()
    adapter = read_adapter(tmp_path / "a")
    assert adapter.config == cfg
    mode = stat.S_IMODE((tmp_path / "a" / ADAPTER_WEIGHTS).stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the user's umask, not mkstemp's 0600


def test_adapter_size_for_a_bf16_model(tmp_path, backend):
    """bf16 values + uint16 gap codes: <= 4.5 bytes per trained entry at 1% density."""
    if backend == "triton":
        pytest.skip("the file size does not depend on the kernel backend (and the interpreter is slow at this size)")
    model = llama(vocab_size=64, hidden_size=256, intermediate_size=704, kv_heads=4).to(torch.bfloat16)
    sel = select(model, None, GallopConfig(density=0.01, scorer="random"))
    sparse = SparseModel(model, sel)
    sparse.save_pretrained(tmp_path / "a")
    size = (tmp_path / "a" / ADAPTER_WEIGHTS).stat().st_size
    assert size / sparse.num_selected <= 4.5, size / sparse.num_selected


def test_load_onto_wrong_base_fails_and_leaves_model_untouched(tmp_path):
    model, sel, sparse = _trained()
    sparse.save_pretrained(tmp_path / "a")
    other = tiny("llama", seed=1)  # same architecture, other weights
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="wrong base model"):
        SparseModel.from_pretrained(other, tmp_path / "a")
    assert [n for n, _ in other.named_parameters()] == list(before)
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in other.named_parameters())
    with pytest.raises(ValueError, match="already merged"):
        SparseModel.from_pretrained(sparse.merge_and_unload(), tmp_path / "a")
    with pytest.raises(ValueError, match="does not have"):
        SparseModel.from_pretrained(tiny("gpt2"), tmp_path / "a")
    with pytest.raises(ValueError, match="dtype"):
        SparseModel.from_pretrained(tiny("llama", dtype=torch.bfloat16), tmp_path / "a")


def test_damaged_or_missing_adapter(tmp_path):
    model, sel, sparse = _trained()
    with pytest.raises(FileNotFoundError, match="not a gallop adapter folder"):
        SparseModel.from_pretrained(tiny("llama"), tmp_path / "missing")
    sparse.save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / ADAPTER_WEIGHTS
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        SparseModel.from_pretrained(tiny("llama"), tmp_path / "a")


def test_nonfinite_values_are_refused_at_save(tmp_path):
    model, sel, sparse = _trained()
    with torch.no_grad():
        sparse.trainable_parameters()[0][0] = float("inf")
    with pytest.raises((ValueError, FloatingPointError), match="NaN or Inf"):
        sparse.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / ADAPTER_WEIGHTS).exists()


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model, sel, sparse = _trained()
    sparse.save_pretrained(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    import gallop.adapters.format as ga

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(ga, "save_file", boom)
    with torch.no_grad():
        sparse.trainable_parameters()[0].add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        sparse.save_pretrained(tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def _write_v1(sparse, directory):
    """An adapter as gallop 0.1 wrote it (int16 gap codes, bf16 deltas, the config beside the file)."""
    from gallop.adapters import base_fingerprint

    directory.mkdir()
    tensors, entries = {}, {}
    states = sparse.export_state()
    for s in states:
        tensors[f"{s.name}.gaps"] = encode_gaps(s.indices).to(torch.int32).to(torch.int16)
        tensors[f"{s.name}.values"] = s.deltas.to(torch.bfloat16)
        entries[s.name] = {"shape": list(s.shape), "dtype": "float32", "count": int(s.indices.numel())}
    save_file(tensors, str(directory / "gallop_adapter.safetensors"), metadata={"format": "gallop"})
    sha = hashlib.sha256((directory / "gallop_adapter.safetensors").read_bytes()).hexdigest()
    cfg = {
        "format": "gallop-adapter",
        "format_version": 1,
        "gallop_config": sparse.selection.config.to_dict(),
        "precision": "bf16",
        "tensors": entries,
        "eligible_shapes": {n: list(s) for n, s in sparse.selection.shapes.items()},
        "base_fingerprint": base_fingerprint(
            [s.name for s in states], [s.shape for s in states], [torch.float32] * len(states), [s.base for s in states]
        ),
        "adapter_sha256": sha,
    }
    (directory / "gallop_config.json").write_text(json.dumps(cfg))


def test_format_version_1_still_loads(tmp_path):
    model, sel, sparse = _trained()
    _write_v1(sparse, tmp_path / "old")
    fresh = tiny("llama")
    loaded = SparseModel.from_pretrained(fresh, tmp_path / "old")
    for s, p in zip(sparse.export_state(), loaded.parameters()):
        assert torch.equal(p.detach(), s.deltas.to(torch.bfloat16).float())  # what 0.1 stored
    assert loaded.num_selected == sel.num_selected


def test_resume_load_adapter_into_the_same_selection(tmp_path):
    model, sel, sparse = _trained()
    sparse.save_pretrained(tmp_path / "a", save_deltas=True)
    fresh = tiny("llama")
    twin = SparseModel(fresh, sel)
    twin.load_adapter_(tmp_path / "a")
    for a, b in zip(twin.parameters(), sparse.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(weights(fresh)[n], p) for n, p in snapshot(model).items())
    other_model, other_sel = setup(scorer="random")
    with pytest.raises(ValueError, match="another selection"):
        SparseModel(other_model, other_sel).load_adapter_(tmp_path / "a")
