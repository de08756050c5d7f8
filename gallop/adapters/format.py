"""The GaLLoP adapter file format: encoding, crash-safe writing, verified reading. Knows files and tensors, not
models (``gallop.adapters.io`` checks adapters against models; nothing here imports ``gallop.sparse``).

Layout (format version 2, PEFT's file names)::

    adapter_model.safetensors   per selected weight NAME:
                                  NAME.indices  uint16 gap code of the sorted flat indices
                                  NAME.values   the trained entries in the weight's own dtype: cast(base + delta),
                                                exactly what the merged weight holds (2 bytes an entry for bf16)
                                  NAME.deltas   optional fp32 deltas, for resuming training exactly
                                and, in its header metadata, the adapter config (the source of truth)
    adapter_config.json         the same config, readable without safetensors (PEFT / Hub convention)
    README.md                   a generated model card

Gap code: indices ``i_0 < i_1 < ...`` become gaps ``i_0 + 1, i_1 - i_0, ...`` (all >= 1) in uint16; a gap above
65535 is written as one 0 ("add 65535, no entry") per 65535 followed by the remainder.

Crash safety: the safetensors file, which carries the config in its header, is written to a temporary file,
fsynced and renamed over the old one; that rename is the commit point. A kill at any moment leaves the old or the
new adapter loadable (the JSON mirror may lag a commit; readers trust the safetensors header). Concurrent writers
to one folder are serialized by an exclusive lock on the folder. Files get the mode the user's umask allows.

The config also holds the base fingerprint (SHA-256 of the pretrained values at the selected entries, so an
adapter loads only onto its base) and the SHA-256 of the tensor data (so damage is detected).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

FORMAT_VERSION = 2
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CARD = "README.md"
LEGACY_WEIGHTS = "gallop_adapter.safetensors"  # format version 1 (gallop 0.1)
LEGACY_CONFIG = "gallop_config.json"
_METADATA_KEY = "gallop_adapter_config"
_ESCAPE = 65535
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PathLike = str | os.PathLike
REQUIRED_KEYS = ("adapter_type", "format_version", "gallop_config", "tensors", "base_fingerprint", "data_sha256")


@dataclass
class AdapterTensor:
    """One selected weight as data (CPU tensors): its name, shape, dtype, indices, trained values and, optionally,
    its fp32 deltas and the fp32 pretrained values at its entries (``base``: what the fingerprint is taken of; never
    written). What ``read_adapter`` returns, ``write_adapter`` takes and ``SparseModel.export_state`` gives."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    indices: torch.Tensor  # int64, sorted unique
    values: torch.Tensor | None  # weight dtype; None only in legacy (v1) adapters, which stored deltas
    deltas: torch.Tensor | None = None  # fp32
    base: torch.Tensor | None = None  # fp32


@dataclass
class Adapter:
    """What ``read_adapter`` returns: the config dict and the tensors, verified."""

    config: dict
    tensors: list[AdapterTensor]
    directory: Path


# ------------------------------------------------------------------------------------------------- gap code
def encode_gaps(indices: torch.Tensor) -> torch.Tensor:
    """Sorted unique non-negative indices -> uint16 gap code (see the module docstring)."""
    idx = indices.to(torch.int64).cpu()
    if idx.numel() == 0:
        return torch.empty(0, dtype=torch.uint16)
    gaps = torch.diff(idx, prepend=torch.tensor([-1]))
    if bool((gaps < 1).any()):
        raise ValueError("indices must be sorted, unique and non-negative to be gap-encoded")
    escapes = (gaps - 1) // _ESCAPE
    rest = gaps - escapes * _ESCAPE  # in [1, 65535]
    ends = torch.cumsum(escapes + 1, 0) - 1
    code = torch.zeros(int(ends[-1]) + 1, dtype=torch.int32)
    code[ends] = rest.to(torch.int32)
    return code.to(torch.uint16)


def decode_gaps(code: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode_gaps`` (also reads the int16 bit patterns of format version 1): int64 indices."""
    u = code.to(torch.int32).to(torch.int64) & 0xFFFF
    if u.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    step = torch.where(u == 0, torch.full_like(u, _ESCAPE), u)
    return (torch.cumsum(step, 0) - 1)[u != 0]


# ------------------------------------------------------------------------------------------------- hashes
def base_fingerprint(
    names: Sequence[str],
    shapes: Sequence[Sequence[int]],
    dtypes: Sequence[torch.dtype],
    base_values: Sequence[torch.Tensor],
) -> str:
    """SHA-256 over every selected weight's name, shape, dtype and exact pretrained values at its entries."""
    h = hashlib.sha256()
    for name, shape, dtype, vals in zip(names, shapes, dtypes, base_values):
        h.update(f"{name}|{tuple(shape)}|{dtype}|".encode())
        h.update(vals.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- writing
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp)`` into a temporary file beside ``path``, fsync it, rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (a reader sees the old or the new file, never a mix)."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    _atomic_write(Path(path), write)


@contextlib.contextmanager
def _folder_lock(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on the folder: concurrent saves to it run one after the other."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, each file is still replaced atomically
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_writable_folder(directory: PathLike, argument: str = "directory") -> None:
    """Raise (ValueError naming ``argument``) unless ``directory`` is, or can be created as, a writable folder.

    Nothing is left behind: the nearest existing ancestor is probed by creating and removing a temporary folder in
    it (which also catches a read-only file system, where permission bits say nothing).
    """
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{argument} {str(directory)!r} exists and is a file; pass a folder path")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{argument} {str(directory)!r} cannot be created: {str(ancestor)!r} is a file")
    try:
        tempfile.TemporaryDirectory(dir=ancestor, prefix=".gallop-probe-").cleanup()
    except OSError as e:
        raise ValueError(
            f"{argument} {str(directory)!r} is not writable ({e.strerror} in {str(ancestor)!r}); pass a folder you "
            f"can write to"
        ) from None


def prepare_folder(directory: PathLike) -> Path:
    """Check that ``directory`` can hold an adapter (creating it); raises ValueError naming it otherwise."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{str(directory)!r} exists and is not a folder; pass a folder path to save the adapter in")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_adapter(
    directory: PathLike, tensors: Sequence[AdapterTensor], config: dict[str, Any], *, model_card: str | None = None
) -> Path:
    """Write an adapter folder (see the module docstring); ``config`` gets the format fields added.

    Values and deltas must be finite: a NaN or Inf is refused (ValueError) before any file is written.
    """
    data: dict[str, torch.Tensor] = {}
    for t in tensors:
        if t.values is None:
            raise ValueError(f"{t.name}: values are required")
        n = t.indices.numel()
        if t.values.numel() != n or (t.deltas is not None and t.deltas.numel() != n):
            raise ValueError(f"{t.name}: {n} indices but {t.values.numel()} values: one value per index")
        if not bool(torch.isfinite(t.values.to(torch.float32)).all()):
            raise ValueError(
                f"the trained values of {t.name!r} hold NaN or Inf (or overflow {t.dtype}); refusing to "
                f"save a broken adapter: check the training loss and learning rate"
            )
        data[f"{t.name}.indices"] = encode_gaps(t.indices)
        data[f"{t.name}.values"] = t.values.detach().to(t.dtype).cpu().contiguous()
        if t.deltas is not None:
            if not bool(torch.isfinite(t.deltas).all()):
                raise ValueError(f"the deltas of {t.name!r} hold NaN or Inf; refusing to save a broken adapter")
            data[f"{t.name}.deltas"] = t.deltas.detach().to(torch.float32).cpu().contiguous()
    config = dict(config)
    config.update(
        {
            "adapter_type": "gallop",
            "format_version": FORMAT_VERSION,
            "has_deltas": any(t.deltas is not None for t in tensors),
            "tensors": {
                t.name: {
                    "shape": list(t.shape),
                    "dtype": str(t.dtype).replace("torch.", ""),
                    "count": int(t.indices.numel()),
                }
                for t in tensors
            },
            "data_sha256": _data_sha256(data),
        }
    )
    text = json.dumps(config, indent=1, sort_keys=False, allow_nan=False)  # strict JSON
    directory = prepare_folder(directory)
    with _folder_lock(directory):
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, MODEL_CARD):  # left by a killed save (we hold the lock)
            for stale in directory.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        _atomic_write(
            directory / ADAPTER_WEIGHTS,
            lambda tmp: save_file(data, tmp, metadata={"format": "pt", _METADATA_KEY: text}),
        )
        atomic_write_text(directory / ADAPTER_CONFIG, text + "\n")
        if model_card is not None:
            atomic_write_text(directory / MODEL_CARD, model_card)
    return directory


# ------------------------------------------------------------------------------------------------- reading
def _config_error(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path}: {what}; the adapter is damaged or was not written by gallop: save it again with "
        f"SparseModel.save_pretrained"
    )


def _check_config(config: Any, path: Path) -> dict:
    if not isinstance(config, dict):
        raise _config_error(path, f"the adapter config must be a JSON object, got a {type(config).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise _config_error(path, f"the adapter config lacks the key {missing[0]!r}")
    if config["adapter_type"] != "gallop":
        raise _config_error(path, f"adapter_type is {config['adapter_type']!r}, not 'gallop'")
    if config["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: adapter format version {config['format_version']!r} is not supported by this "
            f"gallop (it reads versions 1 and {FORMAT_VERSION}); upgrade gallop"
        )
    if not isinstance(config["tensors"], dict) or not config["tensors"]:
        raise _config_error(path, "'tensors' must be a non-empty object")
    for name, meta in config["tensors"].items():
        if not isinstance(meta, dict) or not all(k in meta for k in ("shape", "dtype", "count")):
            raise _config_error(path, f"tensors[{name!r}] needs 'shape', 'dtype' and 'count'")
        if meta["dtype"] not in _DTYPES:
            raise _config_error(path, f"tensors[{name!r}] has an unsupported dtype {meta['dtype']!r}")
        if not (isinstance(meta["shape"], list) and all(isinstance(s, int) and s >= 0 for s in meta["shape"])):
            raise _config_error(path, f"tensors[{name!r}]['shape'] must be a list of sizes")
    if not isinstance(config["gallop_config"], dict):
        raise _config_error(path, "'gallop_config' must be an object")
    return config


def _load_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors) from ONE read of the file: a concurrent save renames a new file over the path, and
    two opens (safetensors' ``safe_open`` reads the header and maps the data separately) could mix two saves."""
    try:
        blob = path.read_bytes()
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
        metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
        tensors = safetensors_load(blob)
    except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: cannot read the safetensors file ({e}); the adapter is damaged: save it again"
        ) from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: its header metadata is not an object; the adapter is damaged: save it again")
    return metadata, tensors


def read_adapter(directory: PathLike) -> Adapter:
    """Read and verify an adapter folder (format 2, or format 1 written by gallop 0.1)."""
    directory = Path(directory)
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        if (directory / LEGACY_WEIGHTS).is_file() and (directory / LEGACY_CONFIG).is_file():
            return _read_legacy(directory)
        raise FileNotFoundError(
            f"{str(directory)!r} is not a gallop adapter folder: it needs {ADAPTER_WEIGHTS} "
            f"(written by SparseModel.save_pretrained)"
        )
    metadata, data = _load_safetensors(path)
    if _METADATA_KEY not in metadata:
        raise _config_error(path, "its header has no gallop adapter config (is it a PEFT adapter of another kind?)")
    try:
        config = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise _config_error(path, f"the embedded config is not valid JSON ({e.msg})") from None
    config = _check_config(config, path)
    if _data_sha256(data) != config["data_sha256"]:
        raise ValueError(
            f"{path}: the tensor data does not match its checksum (SHA-256 differs): the file is "
            f"damaged; save the adapter again"
        )
    tensors = []
    for name, meta in config["tensors"].items():
        for key in ("indices", "values"):
            if f"{name}.{key}" not in data:
                raise _config_error(path, f"the tensor {name}.{key} is missing")
        idx = decode_gaps(data[f"{name}.indices"])
        values = data[f"{name}.values"]
        deltas = data.get(f"{name}.deltas")
        count = meta["count"]
        if idx.numel() != count or values.numel() != count or (deltas is not None and deltas.numel() != count):
            raise _config_error(path, f"{name!r} should have {count} entries but its tensors disagree")
        if values.dtype != _DTYPES[meta["dtype"]]:
            raise _config_error(path, f"{name}.values is {values.dtype}, the config says {meta['dtype']}")
        tensors.append(AdapterTensor(name, tuple(meta["shape"]), _DTYPES[meta["dtype"]], idx, values, deltas))
    return Adapter(config, tensors, directory)


def _read_legacy(directory: Path) -> Adapter:
    """Format version 1 (gallop 0.1): int16 gap codes and bf16/fp32 deltas, the config beside the file.

    Compatibility shim: gallop 0.4 stops reading format version 1 (load and save such an adapter once with 0.2 or
    0.3 to convert it)."""
    cfg_path, path = directory / LEGACY_CONFIG, directory / LEGACY_WEIGHTS
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _config_error(cfg_path, f"not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != "gallop-adapter" or config.get("format_version") != 1:
        raise _config_error(cfg_path, "not a gallop adapter config of format version 1")
    for key in ("tensors", "base_fingerprint", "adapter_sha256", "gallop_config"):
        if key not in config:
            raise _config_error(cfg_path, f"the adapter config lacks the key {key!r}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != config["adapter_sha256"]:
        raise ValueError(
            f"{path} does not match its config (SHA-256 differs): the folder mixes two saves or the file is damaged"
        )
    _, data = _load_safetensors(path)
    tensors = []
    for name, meta in config["tensors"].items():
        idx = decode_gaps(data[f"{name}.gaps"])
        deltas = data[f"{name}.values"].to(torch.float32)
        if idx.numel() != meta["count"] or deltas.numel() != meta["count"]:
            raise _config_error(path, f"{name!r} should have {meta['count']} entries but its tensors disagree")
        tensors.append(AdapterTensor(name, tuple(meta["shape"]), _DTYPES[meta["dtype"]], idx, None, deltas))
    config = {**config, "adapter_type": "gallop", "format_version": 1, "legacy": True}
    return Adapter(config, tensors, directory)


def model_card(config: dict) -> str:
    """A README.md for the adapter folder: base model, method, density, counts, metrics if known."""
    gc = config.get("gallop_config", {})
    base = config.get("base_model_name_or_path") or "unknown"
    lines = [
        "---",
        "library_name: gallop",
        f"base_model: {base}" if base != "unknown" else "",
        "tags:",
        "- gallop",
        "- sparse-fine-tuning",
        "---",
        "",
        f"# GaLLoP adapter for {base}",
        "",
        "Sparse fine-tuning with [gallop](https://arxiv.org/abs/2510.19778): only the selected entries of the base "
        "model's weights were trained; every other weight is the base model's, bit for bit.",
        "",
        "| | |",
        "|---|---|",
        f"| scorer | `{gc.get('scorer', '?')}` |",
        f"| budget | `{gc.get('budget', '?')}` |",
        f"| density | {gc.get('density', '?')} of the eligible weights |",
        f"| trained entries | {config.get('num_selected', '?'):,} of {config.get('num_eligible', '?'):,} eligible "
        f"({config.get('num_parameters', '?'):,} parameters in the model) |"
        if isinstance(config.get("num_selected"), int)
        and isinstance(config.get("num_eligible"), int)
        and isinstance(config.get("num_parameters"), int)
        else "| trained entries | ? |",
        f"| tensors | {len(config.get('tensors', {}))} |",
        "",
    ]
    metrics = config.get("metrics")
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "from gallop import SparseModel",
        'sparse = SparseModel.from_pretrained(base_model, "path/to/this/folder")',
        "model = sparse.merge_and_unload()  # or keep training the wrapper",
        "```",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)
