"""The PEFT export (gallop.adapters.peft, and its shim gallop.peft_export): it loads in peft and reproduces our
outputs; a global selection is refused with the reason."""

import json

import pytest
import torch

from gallop import GallopConfig, SparseModel, select

from ...models import random_batches, tiny
from ..helpers import peft_has_supertuning, saved_adapter

pytestmark = pytest.mark.usefixtures("backend")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_export_loads_in_peft_and_reproduces_the_outputs(tmp_path, dtype):
    from peft import PeftModel

    from gallop.adapters.peft import export_peft

    trained, sparse = saved_adapter(tmp_path, dtype=dtype)
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


def test_the_peft_export_shim_re_exports_the_adapters_functions():
    import gallop.adapters.peft
    import gallop.peft_export

    assert gallop.peft_export.export_peft is gallop.adapters.peft.export_peft
    assert gallop.peft_export.common_sparsity is gallop.adapters.peft.common_sparsity


def test_common_sparsity_is_the_one_sparsity_that_floors_to_every_count():
    from gallop.adapters.peft import common_sparsity

    assert int(1000 * (1 - common_sparsity([10, 20], [1000, 2000]))) == 10
    assert int(2000 * (1 - common_sparsity([10, 20], [1000, 2000]))) == 20
    with pytest.raises(ValueError, match="budget='per_tensor'"):
        common_sparsity([10, 30], [1000, 2000])  # 1% and 1.5%: no single sparsity gives both
