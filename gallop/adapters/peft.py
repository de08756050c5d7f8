"""Export a gallop adapter as a PEFT adapter that ``peft.PeftModel.from_pretrained`` loads.

Which PEFT tuner can hold a GaLLoP selection? Both of peft 0.21's sparse tuners fix each layer's entry count by a
formula, so neither can hold a *global*-budget selection (whose per-layer counts follow the scores):

* **SHiRA** trains ``r * (in + out)`` entries in every layer (a LoRA-equal count), chosen by a mask function.
* **Supertuning** trains ``int(numel * (1 - sparsity))`` entries in every layer, one ``sparsity`` for all of them;
  with ``save_precomputed_indices=True`` the indices are stored in the adapter and loaded as they are.

So the exact export is Supertuning for a ``per_tensor``-budget selection: its counts are
``floor(density * numel)`` per layer, and a single ``sparsity`` with ``int(numel * (1 - sparsity))`` equal to every
layer's count exists whenever those counts are consistent (checked; otherwise a clear error). The values are chosen
so that PEFT's ``weight + values.to(weight.dtype)`` reproduces gallop's ``cast(base + delta)``: exactly for fp32
weights, and to the last bit for bf16/fp16 where such a value exists (the report counts any entry that differs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .format import read_adapter
from .io import check_base, check_fits, values_of

logger = logging.getLogger(__name__)


def common_sparsity(counts: list[int], numels: list[int]) -> float:
    """A ``sparsity`` with ``int(numel * (1 - sparsity)) == count`` for every layer (PEFT Supertuning's rule)."""
    lo = max(c / n for c, n in zip(counts, numels))
    hi = min((c + 1) / n for c, n in zip(counts, numels))
    if not lo < hi:
        raise ValueError(
            "this selection's per-layer counts cannot come from one Supertuning sparsity (a global-budget selection "
            "gives every layer its own density; SHiRA fixes r*(in+out) per layer, so it cannot hold it either): "
            "select with budget='per_tensor' to export to PEFT, or keep the gallop adapter"
        )
    for frac in ((lo + hi) / 2, lo, (3 * lo + hi) / 4, (lo + 3 * hi) / 4):
        sparsity = 1.0 - frac
        if all(int(n * (1 - sparsity)) == c for c, n in zip(counts, numels)):
            return sparsity
    raise ValueError("no float sparsity reproduces this selection's per-layer counts exactly; export is not possible")


def _neighbours(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` and the next representable values below and above it, in ``x``'s own (half-precision) dtype."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return [x]
    bits = x.view(torch.int16).to(torch.int32)
    sign = torch.where(bits < 0, -1, 1)
    out = [x]
    for step in (1, -1):  # one ulp away from zero / toward zero, for positive and negative values alike
        moved = (bits + sign * step).to(torch.int16).view(x.dtype)
        out.append(torch.where(x == 0, x.new_tensor(step * 2**-24, dtype=torch.float32).to(x.dtype), moved))
    return out


def _peft_values(merged: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, int]:
    """fp32 values ``v`` with ``base + v.to(dtype) == merged`` in the weight's dtype (PEFT's merge), and how many
    entries have no such value among the candidates tried."""
    exact = merged.float() - base.float()
    v = exact.clone()
    err = ((base + v.to(base.dtype)).float() - merged.float()).abs()
    for candidate in _neighbours(exact.to(base.dtype)):  # keep, per entry, the candidate landing nearest
        cand_err = ((base + candidate).float() - merged.float()).abs()
        better = cand_err < err
        v = torch.where(better, candidate.float(), v)
        err = torch.where(better, cand_err, err)
    return v, int((err > 0).sum())


def export_peft(adapter: str | Path, base_model: nn.Module, out: str | Path) -> dict[str, Any]:
    """Write the gallop adapter at ``adapter`` (trained on ``base_model``, the pristine base) as a PEFT Supertuning
    adapter folder ``out``. ``base_model`` is wrapped by PEFT for the export and unwrapped afterwards."""
    data = read_adapter(adapter)
    params = check_fits(data, base_model)
    if any(not t.name.endswith(".weight") for t in data.tensors):
        raise ValueError("the PEFT export handles module weights only")
    counts = [int(t.indices.numel()) for t in data.tensors]
    numels = [params[t.name].numel() for t in data.tensors]
    sparsity = common_sparsity(counts, numels)
    bases = [params[t.name].detach().reshape(-1)[t.indices.to(params[t.name].device)] for t in data.tensors]
    check_base(data, bases)
    try:  # after the checks: a selection that cannot be exported says so whatever the installed peft
        from peft import SupertuningConfig, get_peft_model
    except ImportError:
        raise ImportError("the PEFT export needs peft >= 0.21 (with Supertuning): pip install -U peft") from None
    targets = [t.name[: -len(".weight")] for t in data.tensors]
    config = SupertuningConfig(target_modules=targets, sparsity=sparsity, save_precomputed_indices=True)
    peft_model = get_peft_model(base_model, config)
    modules = dict(peft_model.get_base_model().named_modules())
    inexact = 0
    try:
        with torch.no_grad():
            for t, base, name in zip(data.tensors, bases, targets):
                layer = modules[name]
                merged = values_of(t, base)
                values, bad = _peft_values(merged, base)
                inexact += bad
                layer.supertuning_indices["default"] = t.indices.to(torch.int32).to(base.device)
                layer.supertuning_values["default"].data = values.to(layer.supertuning_values["default"].device)
        peft_model.save_pretrained(str(out))
    finally:
        peft_model.unload()
    report = {
        "peft_type": "SUPERTUNING",
        "sparsity": sparsity,
        "num_selected": sum(counts),
        "inexact": inexact,
        "exact": inexact == 0,
    }
    logger.info(
        "exported %s entries as a PEFT Supertuning adapter (sparsity %.6f); %d entries inexact",
        sum(counts),
        sparsity,
        inexact,
    )
    return report
