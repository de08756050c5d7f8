"""Save and load GaLLoP adapters: compact safetensors + a JSON config, written atomically.

Layout of an adapter folder::

    gallop_adapter.safetensors   per selected tensor NAME: "NAME.gaps" (int16 bit patterns of uint16 gaps)
                                 and "NAME.values" (the delta, bf16 or fp32)
    gallop_config.json           format version, GallopConfig, precision, counts, shapes, dtypes, the SHA-256
                                 of the adapter file and a fingerprint of the base weights at the selected entries

Indices are sorted, so they are stored as gaps ``idx[0] + 1, idx[1] - idx[0], ...`` (all >= 1) in uint16; a gap
above 65535 is written as one 0 ("add 65535, no entry") per 65535 followed by the remainder. At 1% density that is
2 bytes an index; with bf16 values, 4 bytes a selected entry. Loading checks the adapter file against the config's
hash and the target model against the base fingerprint before it changes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import gallop_kernels

from . import __version__
from .config import GallopConfig
from .selection import Selection
from .sparse import SparseModel

FORMAT_VERSION = 1
ADAPTER_FILE = "gallop_adapter.safetensors"
CONFIG_FILE = "gallop_config.json"
_PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
_ESCAPE = 65535
PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------- gap coding
def encode_gaps(indices: torch.Tensor) -> torch.Tensor:
    """Sorted unique non-negative indices -> int16 tensor holding the uint16 gap code (see module doc)."""
    idx = indices.to(torch.int64).cpu()
    if idx.numel() == 0:
        return torch.empty(0, dtype=torch.int16)
    gaps = torch.diff(idx, prepend=torch.tensor([-1]))
    if bool((gaps < 1).any()):
        raise ValueError("indices must be sorted, unique and non-negative to be gap-encoded")
    escapes = (gaps - 1) // _ESCAPE
    rest = gaps - escapes * _ESCAPE  # in [1, 65535]
    ends = torch.cumsum(escapes + 1, 0) - 1
    code = torch.zeros(int(ends[-1]) + 1, dtype=torch.int32)
    code[ends] = rest.to(torch.int32)
    return torch.where(code > 32767, code - 65536, code).to(torch.int16)


def decode_gaps(code: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode_gaps``: int64 indices."""
    u = code.to(torch.int64) & 0xFFFF
    if u.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    step = torch.where(u == 0, torch.full_like(u, _ESCAPE), u)
    return (torch.cumsum(step, 0) - 1)[u != 0]


# ------------------------------------------------------------------------------------------- helpers
def _fingerprint(names, shapes, dtypes, base_values) -> str:
    """SHA-256 over every selected tensor's name, shape, dtype and exact base values at the selected entries."""
    h = hashlib.sha256()
    for name, shape, dtype, vals in zip(names, shapes, dtypes, base_values):
        h.update(f"{name}|{tuple(shape)}|{dtype}|".encode())
        h.update(vals.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _base_fingerprint(sparse: SparseModel) -> str:
    """The fingerprint of the pretrained values a SparseModel keeps for its selected entries."""
    return _fingerprint(sparse._names, [p.shape for p in sparse._params], [p.dtype for p in sparse._params],
                        [sparse._slice(sparse.base, i) for i in range(len(sparse._names))])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------- save / load
def save_adapter(sparse: SparseModel, directory: PathLike, *, precision: str = "bf16") -> Path:
    """Save ``sparse``'s selection and delta to ``directory`` (created if needed); returns the folder.

    ``precision="bf16"`` (default) stores the delta in bf16 (4 bytes a selected entry in total);
    ``precision="fp32"`` stores it losslessly (6 bytes), e.g. for resuming training.
    Each file is replaced atomically, adapter first, then the config that vouches for it.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    if sparse._unloaded:
        raise RuntimeError("this SparseModel was unloaded (merge_and_unload); save before unloading")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)

    tensors: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    entries = OrderedDict()
    deltas = sparse.named_deltas()
    for i, (name, p) in enumerate(zip(sparse._names, sparse._params)):
        tensors[f"{name}.gaps"] = encode_gaps(sparse._indices[i])
        tensors[f"{name}.values"] = deltas[name].to(_PRECISIONS[precision]).cpu().contiguous()
        entries[name] = {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                         "count": int(sparse._indices[i].numel())}
    adapter_path = directory / ADAPTER_FILE
    atomic_write(adapter_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "gallop"}))
    config = {
        "format": "gallop-adapter",
        "format_version": FORMAT_VERSION,
        "gallop_version": __version__,
        "gallop_config": sparse.selection.config.to_dict(),
        "precision": precision,
        "num_selected": sparse.num_selected,
        "num_eligible": sparse.selection.num_eligible,
        "eligible_shapes": {n: list(s) for n, s in sparse.selection.shapes.items()},
        "tensors": entries,
        "base_fingerprint": _base_fingerprint(sparse),
        "adapter_sha256": _sha256_file(adapter_path),
    }
    atomic_write(directory / CONFIG_FILE,
                  lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1), encoding="utf-8"))
    return directory


def read_adapter(directory: PathLike) -> tuple[dict, dict]:
    """Read and verify an adapter folder: returns (config dict, tensors dict)."""
    directory = Path(directory)
    cfg_path, adapter_path = directory / CONFIG_FILE, directory / ADAPTER_FILE
    if not cfg_path.is_file() or not adapter_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a gallop adapter folder: it needs {CONFIG_FILE} and "
                                f"{ADAPTER_FILE} (written by SparseModel.save_pretrained)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e.msg})") from None
    if config.get("format") != "gallop-adapter":
        raise ValueError(f"{cfg_path}: not a gallop adapter config")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format version {config.get('format_version')} is not supported by this gallop "
                         f"(reads version {FORMAT_VERSION}); upgrade gallop")
    if _sha256_file(adapter_path) != config.get("adapter_sha256"):
        raise ValueError(f"{adapter_path} does not match its config (SHA-256 differs): the folder mixes two saves "
                         f"or the file is damaged")
    return config, load_file(str(adapter_path))


def load_adapter(model: nn.Module, directory: PathLike) -> SparseModel:
    """Wrap ``model`` (the pretrained base, unmodified) with the adapter saved in ``directory``.

    Everything is checked before the model is touched: parameter names, shapes and dtypes, index ranges, and the
    fingerprint of the base weights at the selected entries (which fails on another base model, or on a model
    that already has this adapter merged).
    """
    config, tensors = read_adapter(directory)
    params = dict(model.named_parameters())
    names = list(config["tensors"])
    indices, values = OrderedDict(), []
    for name in names:
        meta = config["tensors"][name]
        if name not in params:
            raise ValueError(f"the adapter trains {name!r}, which this model does not have: wrong base model")
        p = params[name]
        if list(p.shape) != meta["shape"] or str(p.dtype).replace("torch.", "") != meta["dtype"]:
            raise ValueError(f"the adapter expects {name!r} as {meta['dtype']}{meta['shape']} but the model has "
                             f"{str(p.dtype).replace('torch.', '')}{list(p.shape)}: wrong base model or dtype")
        idx = decode_gaps(tensors[f"{name}.gaps"])
        if idx.numel() != meta["count"] or (idx.numel() and int(idx[-1]) >= p.numel()):
            raise ValueError(f"the adapter's indices for {name!r} are damaged")
        indices[name] = idx.to(torch.int32 if p.numel() < 2**31 else torch.int64)
        values.append(tensors[f"{name}.values"])
    base_now = [gallop_kernels.gather(params[n].detach(), indices[n].to(params[n].device)) for n in names]
    fingerprint = _fingerprint(names, [params[n].shape for n in names], [params[n].dtype for n in names], base_now)
    if fingerprint != config["base_fingerprint"]:
        raise ValueError("the model's weights at the adapter's entries differ from the base it was trained on: "
                         "wrong base model, or an adapter is already merged into it (load onto the pristine base)")
    shapes = OrderedDict((n, tuple(s)) for n, s in config["eligible_shapes"].items())
    selection = Selection(indices, shapes, GallopConfig.from_dict(config["gallop_config"]))
    sparse = SparseModel(model, selection)
    with torch.no_grad():
        sparse.delta.copy_(torch.cat([v.to(torch.float32) for v in values]).to(sparse.delta.device))
    sparse.merge()
    return sparse


def load_delta_(sparse: SparseModel, directory: PathLike) -> None:
    """Load a saved delta into an existing SparseModel with the same selection and base (for resuming)."""
    config, tensors = read_adapter(directory)
    if list(config["tensors"]) != sparse._names:
        raise ValueError(f"the adapter in {str(directory)!r} was saved for another selection")
    if _base_fingerprint(sparse) != config["base_fingerprint"]:
        raise ValueError(f"the adapter in {str(directory)!r} was trained on another base model")
    for i, name in enumerate(sparse._names):
        if not torch.equal(decode_gaps(tensors[f"{name}.gaps"]), sparse._indices[i].to(torch.int64).cpu()):
            raise ValueError(f"the adapter in {str(directory)!r} selects other entries of {name!r}")
    with torch.no_grad():
        sparse.delta.copy_(torch.cat([tensors[f"{n}.values"].to(torch.float32) for n in sparse._names])
                           .to(sparse.delta.device))
    sparse.sync()
