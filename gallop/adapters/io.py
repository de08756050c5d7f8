"""Saving and loading adapters for models: the one place that checks an adapter against a base model.

``gallop.adapters.format`` knows files and tensors; this module knows models. It resolves a folder or Hub id
(``resolve``), checks that an adapter fits a model and was trained on its weights (``check_fits``,
``check_base``: the one base-fingerprint check), turns stored values into fp32 deltas (``deltas_of``: the one
values-to-deltas rule), builds the config an adapter records (``adapter_config``) and saves (``save``, ``push``).
``SparseModel.save_pretrained`` / ``from_pretrained`` / ``load_adapter_``, ``GallopTrainer`` (through them) and
the PEFT export all go through these functions. It imports nothing from ``gallop.sparse``.
"""

from __future__ import annotations

import math
import numbers
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gallop_kernels

from .. import quantized
from ..config import GallopConfig
from ..selection import Selection, dense_weight, quantized_owners, weight_shape
from .format import Adapter, AdapterTensor, PathLike, base_fingerprint, model_card, read_adapter, write_adapter


# ------------------------------------------------------------------------------------------------- where
def resolve(path_or_id: Any, revision: str | None = None) -> Path:
    """A local folder as is; anything else is taken for a Hub repo id and fetched (cached) by huggingface_hub."""
    if Path(path_or_id).exists() or revision is None and not isinstance(path_or_id, str):
        return Path(path_or_id)
    if isinstance(path_or_id, str) and path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:  # pragma: no cover - transformers depends on it
            raise FileNotFoundError(
                f"{path_or_id!r} is not a folder, and huggingface_hub is not installed to fetch it from the Hub"
            ) from None
        try:
            return Path(snapshot_download(path_or_id, revision=revision))
        except Exception as e:  # offline, no such repo, no access: one clear error
            raise FileNotFoundError(
                f"{path_or_id!r} is not a local folder and could not be fetched from the Hub ({type(e).__name__}: {e})"
            ) from None
    return Path(path_or_id)


# ------------------------------------------------------------------------------------------------- checks
def onto_original(adapter: Adapter, model: nn.Module) -> bool:
    """Whether ``adapter`` was trained on a quantized base and ``model`` is dense (its original, in any float
    dtype): the deltas are then added at the indices, as QLoRA adapters are used (the outputs differ from the
    quantized base's by its quantization error). Raises ValueError, naming both, for any other mismatch of
    quantization (a dense adapter onto a quantized base, or two different quantizations)."""
    trained_on = adapter.config.get("quantization")
    model_q = quantized.quantization_of(model)
    if trained_on == model_q:
        return False
    if trained_on is not None and model_q is None:
        return True
    raise ValueError(
        f"the adapter in {str(adapter.directory)!r} was trained on a {trained_on or 'dense (not quantized)'} base but "
        f"this model is {model_q or 'dense (not quantized)'}: load it onto a base quantized the same way"
        + ("" if trained_on is None else " (or onto the dense original)")
    )


def check_fits(adapter: Adapter, model: nn.Module) -> dict[str, nn.Parameter]:
    """Raise ValueError unless every tensor of ``adapter`` names a weight of ``model`` with its shape and dtype (any
    float dtype for a quantized adapter onto the dense original) and indices inside it, and the model is quantized as
    the adapter's base was (``onto_original``); returns the model's parameters by name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    any_dtype = onto_original(adapter, model)
    params = dict(model.named_parameters())
    owners = quantized_owners(model)
    for t in adapter.tensors:
        if t.name not in params:
            raise ValueError(f"the adapter trains {t.name!r}, which this model does not have: wrong base model")
        p = params[t.name]
        shape = weight_shape(model, p, owners)
        dtype = quantized.dense_dtype(owners[id(p)]) if id(p) in owners else p.dtype
        if shape != t.shape or (dtype != t.dtype and not any_dtype):
            raise ValueError(
                f"the adapter expects {t.name!r} as {t.dtype}{list(t.shape)} but the model has "
                f"{dtype}{list(shape)}: wrong base model or dtype (load the model with dtype={t.dtype})"
            )
        if t.indices.numel() and int(t.indices[-1]) >= math.prod(shape):
            raise ValueError(f"the adapter's indices for {t.name!r} run past the weight: the adapter is damaged")
    return params


def check_base(adapter: Adapter, bases: Sequence[torch.Tensor]) -> None:
    """Raise ValueError unless ``bases`` (the model's values at each adapter tensor's entries, any float dtype) are
    the values the adapter was trained on: the one base-fingerprint check."""
    names = [t.name for t in adapter.tensors]
    shapes = [t.shape for t in adapter.tensors]
    fingerprint = base_fingerprint(names, shapes, [t.dtype for t in adapter.tensors], bases)
    if fingerprint != adapter.config["base_fingerprint"]:
        raise ValueError(
            f"the model's weights at the entries of the adapter in {str(adapter.directory)!r} differ from the base "
            f"it was trained on: wrong base model, or an adapter is already merged into it (load the pristine base)"
        )


# ------------------------------------------------------------------------------------------------- values -> deltas
def values_of(t: AdapterTensor, base: torch.Tensor) -> torch.Tensor:
    """What the merged weight holds at ``t``'s entries, in its dtype, on ``base``'s device: the stored values, or
    ``cast(base + deltas)`` for a format-1 adapter (which stored deltas only)."""
    if t.values is not None:
        return t.values.to(base.device)
    if t.deltas is None:
        raise ValueError(f"the adapter stores neither values nor deltas for {t.name!r}: it is damaged")
    return (base.detach().float().cpu() + t.deltas).to(t.dtype).to(base.device)


def deltas_of(t: AdapterTensor, base: torch.Tensor) -> torch.Tensor:
    """fp32 deltas for ``t`` onto the fp32 ``base``: its stored deltas (checked), else ones reproducing its values.
    The one values-to-deltas rule of every load."""
    deltas = None if t.deltas is None else t.deltas.to(base.device)
    return deltas_for_values(t.name, values_of(t, base), base, t.dtype, deltas)


def deltas_for_values(
    name: str, values: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, deltas: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 deltas with ``cast(base + delta) == values`` exactly, for the selected weight ``name``.

    Given ``deltas`` are checked and returned; otherwise ``values - base`` is nudged by fp32 ulps where the sum
    does not round back to the value (fp32 weights can need that; bf16 and fp16 weights never do).
    """
    values = values.reshape(-1).to(dtype)
    if values.numel() != base.numel():
        raise ValueError(f"{name!r} has {base.numel()} selected entries but {values.numel()} values were given")
    if deltas is not None:
        d = deltas.reshape(-1).to(torch.float32)
        if d.numel() != base.numel() or not torch.equal((base + d).to(dtype), values):
            raise ValueError(
                f"the stored deltas of {name!r} do not reproduce its stored values: the adapter is damaged"
            )
        return d.clone()
    target = values.to(torch.float32)
    d = target - base
    for _ in range(64):
        got = (base + d).to(dtype)
        bad = got != values
        if not bool(bad.any()):
            return d
        direction = torch.where(got[bad].to(torch.float32) < target[bad], math.inf, -math.inf)
        d[bad] = torch.nextafter(d[bad], direction.to(torch.float32))
    raise ValueError(
        f"could not reconstruct fp32 deltas of {name!r} that reproduce the stored values exactly; save "
        f"the adapter with save_deltas=True"
    )


# ------------------------------------------------------------------------------------------------- loading
def load(model: nn.Module, directory: Any, revision: str | None = None) -> tuple[Selection, dict[str, torch.Tensor]]:
    """(the Selection, fp32 deltas by name) of the adapter at ``directory`` (a folder or Hub id) for ``model``,
    the pristine base. Everything is checked, and ``model`` is not touched."""
    adapter = read_adapter(resolve(directory, revision))
    params = check_fits(adapter, model)
    owners = quantized_owners(model)
    indices: OrderedDict[str, torch.Tensor] = OrderedDict()
    bases = []
    for t in adapter.tensors:
        p = params[t.name]
        idx = t.indices.to(p.device, gallop_kernels.index_dtype(math.prod(t.shape)))
        indices[t.name] = idx
        bases.append(gallop_kernels.gather(dense_weight(model, p, owners), idx, check_indices=False))
    if onto_original(adapter, model):  # the quantized base's deltas, added to the original's values
        deltas = {}
        for t, base in zip(adapter.tensors, bases):
            if t.deltas is None:
                raise ValueError(f"the adapter stores no fp32 deltas for {t.name!r}: it is damaged")
            deltas[t.name] = t.deltas.reshape(-1).to(base.device, torch.float32)
    else:
        check_base(adapter, bases)
        deltas = {t.name: deltas_of(t, base) for t, base in zip(adapter.tensors, bases)}
    shapes = adapter.config.get("eligible_shapes") or {t.name: list(t.shape) for t in adapter.tensors}
    selection = Selection(
        indices,
        OrderedDict((n, tuple(s)) for n, s in shapes.items()),
        GallopConfig.from_dict(adapter.config["gallop_config"]),
    )
    return selection, deltas


def load_for(
    directory: Any,
    model: nn.Module,
    names: Sequence[str],
    indices: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """fp32 deltas by name from the adapter at ``directory``, which must hold exactly the selection ``names`` ->
    ``indices`` trained on ``bases`` (fp32) of ``model``: to resume a SparseModel from a checkpoint."""
    adapter = read_adapter(directory)
    if [t.name for t in adapter.tensors] != list(names) or any(
        not torch.equal(t.indices, i.to("cpu", torch.int64)) for t, i in zip(adapter.tensors, indices)
    ):
        raise ValueError(
            f"the adapter in {str(directory)!r} was saved for another selection: load it with "
            f"SparseModel.from_pretrained(base_model, path) instead"
        )
    check_fits(adapter, model)
    check_base(adapter, bases)
    return {t.name: deltas_of(t, base) for t, base in zip(adapter.tensors, bases)}


# ------------------------------------------------------------------------------------------------- saving
def adapter_config(model: nn.Module, selection: Selection, tensors: Sequence[AdapterTensor]) -> dict:
    """The config an adapter of ``model`` wrapped with ``selection`` records (without the per-tensor part);
    ``tensors`` carry the fp32 ``base`` of each selected weight."""
    mc = getattr(model, "config", None)
    num_selected = sum(int(t.indices.numel()) for t in tensors)
    return {
        "base_model_name_or_path": getattr(mc, "_name_or_path", None) or None,
        "revision": getattr(mc, "_commit_hash", None),
        "gallop_version": gallop_kernels.__version__,
        "gallop_config": selection.config.to_dict(),
        "quantization": quantized.quantization_of(model),
        "num_selected": num_selected,
        "num_eligible": selection.num_eligible,
        "num_parameters": sum(p.numel() for p in model.parameters()) - num_selected,
        "eligible_shapes": {n: list(s) for n, s in selection.shapes.items()},
        "base_fingerprint": base_fingerprint(
            [t.name for t in tensors],
            [t.shape for t in tensors],
            [t.dtype for t in tensors],
            [_base(t) for t in tensors],
        ),
    }


def _base(t: AdapterTensor) -> torch.Tensor:
    if t.base is None:
        raise ValueError(f"{t.name!r}: the base values are needed for the adapter config")
    return t.base


def checked_metrics(metrics: Any) -> dict[str, Any]:
    """``metrics`` as the adapter config stores it (strict JSON): name -> finite number, string or bool."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (str, bool)) or v is None:
            out[str(k)] = v
        elif isinstance(v, numbers.Real) and math.isfinite(float(v)):
            out[str(k)] = int(v) if isinstance(v, numbers.Integral) else float(v)
        elif isinstance(v, numbers.Real):
            raise ValueError(f"metrics[{k!r}] is {v}: the adapter config is strict JSON; drop the entry or store None")
        else:
            raise TypeError(
                f"metrics[{k!r}] is a {type(v).__name__}; metrics hold numbers, strings, booleans or None "
                f"(strict JSON): pass float(value)"
            )
    return out


def save_deltas_for(precision: str | None, save_deltas: bool) -> bool:
    """``save_deltas`` with the 0.1 spelling ``precision=`` folded in (``"fp32"`` = ``save_deltas=True``, ``"bf16"``
    = the default). Compatibility shim: ``precision=`` goes in gallop 0.4."""
    if precision is None:
        return save_deltas
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32' (or use save_deltas=True), got {precision!r}")
    return save_deltas or precision == "fp32"


def save(
    directory: PathLike, tensors: Sequence[AdapterTensor], config: dict, *, save_deltas: bool, metrics: dict | None
) -> Path:
    """Write the adapter folder (atomically, see ``gallop.adapters.format``): ``tensors`` with their values (and
    their fp32 deltas when ``save_deltas``), ``config`` from ``adapter_config`` plus ``metrics`` (checked already)."""
    config = dict(config)
    if metrics:
        config["metrics"] = metrics
    stored = [
        AdapterTensor(t.name, t.shape, t.dtype, t.indices, t.values, t.deltas if save_deltas else None) for t in tensors
    ]
    return write_adapter(directory, stored, config, model_card=model_card(config))


def push(
    save_to: Callable[[Path], None],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload GaLLoP adapter",
    revision: str | None = None,
) -> None:
    """Save through ``save_to(folder)`` into a temporary folder and upload it to the Hub repository ``repo_id``
    (created if needed) with ``huggingface_hub``."""
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        save_to(Path(tmp))
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision, repo_type="model"
        )
