"""Adapters for models (gallop.adapters.io): PEFT's folder layout and config, bit-identical reload in the weight's
dtype, the fit and base-fingerprint checks, resuming into a selection, Hub ids and pushes."""

import json
import os
import stat

import pytest
import torch

from gallop import SparseAdamW, SparseModel
from gallop.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter

from ...models import random_batches, tiny
from ..helpers import saved_adapter, setup, snapshot, train, trained, weights

pytestmark = pytest.mark.usefixtures("backend")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("save_deltas", [False, True])
def test_reload_reproduces_the_trained_weights_bit_for_bit(tmp_path, dtype, save_deltas):
    """The default adapter, loaded onto the pretrained model, gives the trained weights exactly (0.1 stored bf16
    deltas: every trained entry differed on fp32 models and 159 of 576 on bf16)."""
    model, sel, sparse = trained(dtype, lr=1e-3)
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
    model, sel, sparse = trained()
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


def test_load_onto_wrong_base_fails_and_leaves_model_untouched(tmp_path):
    model, sel, sparse = trained()
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


def test_resume_load_adapter_into_the_same_selection(tmp_path):
    model, sel, sparse = trained()
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


def test_from_pretrained_resolves_a_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download; here offline, from a local cache."""
    import huggingface_hub

    trained, sparse = saved_adapter(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kw):
        calls.append((repo_id, revision))
        return str(tmp_path / "adapter")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    fresh = tiny("llama")
    SparseModel.from_pretrained(fresh, "someone/gallop-adapter", revision="v1")
    assert calls == [("someone/gallop-adapter", "v1")]
    got = weights(fresh)
    for n, b in weights(trained).items():
        assert torch.equal(got[n], b), n


def test_push_to_hub_uploads_the_adapter_folder(tmp_path, monkeypatch):
    import huggingface_hub

    _, sparse = saved_adapter(tmp_path)
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, repo_type=None):
            uploaded["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
            uploaded["message"] = commit_message

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    sparse.push_to_hub("someone/gallop-adapter", commit_message="trained")
    assert uploaded["repo"] == "someone/gallop-adapter" and uploaded["message"] == "trained"
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
