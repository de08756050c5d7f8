"""The adapter file format (gallop.adapters.format): gap codes, the bytes an entry costs, verified reads, crash-safe
writes, the version-1 reader."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from gallop import GallopConfig, SparseModel, select
from gallop.adapters import ADAPTER_WEIGHTS, decode_gaps, encode_gaps

from ...models import llama, tiny
from ..helpers import trained

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


def test_damaged_or_missing_adapter(tmp_path):
    model, sel, sparse = trained()
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
    model, sel, sparse = trained()
    with torch.no_grad():
        sparse.trainable_parameters()[0][0] = float("inf")
    with pytest.raises((ValueError, FloatingPointError), match="NaN or Inf"):
        sparse.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / ADAPTER_WEIGHTS).exists()


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model, sel, sparse = trained()
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
    model, sel, sparse = trained()
    _write_v1(sparse, tmp_path / "old")
    fresh = tiny("llama")
    loaded = SparseModel.from_pretrained(fresh, tmp_path / "old")
    for s, p in zip(sparse.export_state(), loaded.parameters()):
        assert torch.equal(p.detach(), s.deltas.to(torch.bfloat16).float())  # what 0.1 stored
    assert loaded.num_selected == sel.num_selected
