"""Backend choice: Triton kernels for CUDA tensors, the pure-PyTorch reference everywhere else.

``GALLOP_BACKEND=auto`` (default) picks Triton for CUDA tensors when triton imports, the reference otherwise;
``GALLOP_BACKEND=reference`` forces the reference; ``GALLOP_BACKEND=triton`` forces the Triton kernels (on CPU
tensors this needs ``TRITON_INTERPRET=1``, which is how CI tests the kernels without a GPU).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Optional, Union

import torch

from . import reference

_CHOICES = ("auto", "reference", "triton")
# op name -> module (inside gallop_kernels) holding its Triton implementation. An op missing here has no Triton
# kernel (yet): it runs its reference implementation under every backend choice.
_TRITON_MODULES = {
    "select_topk": "select",
    "sparse_adamw_": "adamw",
    "sparse_adamw_step_": "adamw",
    "gather": "scatter",
    "scatter_": "scatter",
}


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else at import
        return False
    return True


def _choice() -> str:
    choice = os.environ.get("GALLOP_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"GALLOP_BACKEND must be one of {', '.join(_CHOICES)}, got {choice!r}")
    return choice


def backend(device: Optional[Union[str, torch.device]] = None) -> str:
    """Name of the backend (``"triton"`` or ``"reference"``) that ops on tensors of ``device`` will use.

    With no ``device``, answers for the default accelerator: CUDA when available, else the CPU.
    """
    choice = _choice()
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not _triton_importable():
            raise RuntimeError("GALLOP_BACKEND=triton but triton cannot be imported: install triton "
                               "(Linux) or set GALLOP_BACKEND=reference")
        return "triton"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "triton" if torch.device(device).type == "cuda" and _triton_importable() else "reference"


def implementation(op: str, device: torch.device) -> Callable:
    """The function implementing ``op`` for tensors on ``device`` under the current backend choice."""
    if backend(device) == "reference":
        return getattr(reference, op)
    if op not in _TRITON_MODULES:
        return getattr(reference, op)
    module = importlib.import_module(f"{__package__}.{_TRITON_MODULES[op]}")
    return getattr(module, op)
