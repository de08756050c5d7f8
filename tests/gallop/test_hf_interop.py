"""Hugging Face interop: the PEFT export loads in peft and reproduces our outputs, adapters load from a local Hub
cache and push to the Hub, TRL's SFTTrainer trains a GaLLoP-wrapped model."""

import json

import pytest
import torch

from gallop import GallopConfig, SparseAdamW, SparseModel, select

from ..models import llama, random_batches, tiny
from .helpers import peft_has_supertuning, train, weights

pytestmark = pytest.mark.usefixtures("backend")


def _trained(tmp_path, budget="per_tensor", dtype=torch.float32):
    model = tiny("llama", dtype=dtype)
    sel = select(model, None, GallopConfig(density=0.1, scorer="random", budget=budget))
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(3))
    sparse.save_pretrained(tmp_path / "adapter")
    return model, sparse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_export_loads_in_peft_and_reproduces_the_outputs(tmp_path, dtype):
    from peft import PeftModel

    from gallop.adapters.peft import export_peft

    trained, sparse = _trained(tmp_path, dtype=dtype)
    if not peft_has_supertuning():  # an older peft: a clear error, nothing written
        with pytest.raises(ImportError, match=r"needs peft >= 0.21"):
            export_peft(tmp_path / "adapter", tiny("llama", dtype=dtype), tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    report = export_peft(tmp_path / "adapter", tiny("llama", dtype=dtype), tmp_path / "peft")
    assert report["peft_type"] == "SUPERTUNING" and report["num_selected"] == sparse.num_selected
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SUPERTUNING"
    peft_model = PeftModel.from_pretrained(tiny("llama", dtype=dtype), tmp_path / "peft")
    merged = peft_model.merge_and_unload()
    ours = {n: p for n, p in trained.named_parameters() if not n.endswith("gallop_delta")}
    mismatched = sum(int((p != ours[n]).sum()) for n, p in merged.named_parameters())
    assert mismatched == report["inexact"]
    batch = random_batches(1, seed=3)[0]
    with torch.no_grad():
        got, want = merged(**batch).logits, trained(**batch).logits
    if dtype == torch.float32:  # PEFT's merge (weight + value) can reproduce every fp32 entry: bit-identical
        assert report["exact"] and mismatched == 0
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # PEFT rounds the value to bf16 before adding it: an entry whose value is coarser than the weight's
        # spacing lands on the nearest reachable weight, at most one step of the value's bf16 spacing away
        base = dict(tiny("llama", dtype=dtype).named_parameters())
        for n, p in merged.named_parameters():
            diff = (p.float() - ours[n].float()).abs()
            step = torch.finfo(dtype).eps * (ours[n].float() - base[n].float()).abs()
            assert bool((diff <= step + 1e-30).all()), n
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_a_global_selection_cannot_be_exported_and_says_why(tmp_path):
    from gallop.adapters.peft import export_peft

    model = tiny("llama")
    sel = select(model, None, GallopConfig(density=0.1, scorer="magnitude"))  # uneven per-layer counts
    SparseModel(model, sel).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="budget='per_tensor'"):
        export_peft(tmp_path / "adapter", tiny("llama"), tmp_path / "peft")


def test_from_pretrained_resolves_a_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download; here offline, from a local cache."""
    import huggingface_hub

    trained, sparse = _trained(tmp_path)
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

    _, sparse = _trained(tmp_path)
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


def test_trl_sft_trainer_trains_a_gallop_model(tmp_path):
    """TRL's SFTTrainer with the SparseModel as its model: only the selected entries move."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer

    from gallop.models import smollm2_gguf

    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = llama(vocab_size=len(tok), max_position_embeddings=128)
    sel = select(model, None, GallopConfig(density=0.05, scorer="random"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = SparseModel(model, sel)
    data = datasets.Dataset.from_list(
        [{"prompt": f"Is {i} even?", "completion": " yes" if i % 2 == 0 else " no"} for i in range(16)]
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(model=sparse, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters() if n in before)
    assert 0 < changed <= sel.num_selected
