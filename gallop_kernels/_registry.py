"""Backend registration and choice: one line per op, Triton kernels for CUDA tensors, the reference elsewhere.

Each op lives in a folder holding ``reference.py`` (the pure-PyTorch twin) and, when it has a Triton kernel,
``triton.py``; both define a function named after the op. ``OPS`` maps each op to its folder.

``GALLOP_BACKEND=auto`` (default) picks Triton for CUDA tensors when triton imports, the reference otherwise;
``GALLOP_BACKEND=reference`` forces the reference; ``GALLOP_BACKEND=triton`` forces the Triton kernels (on CPU
tensors this needs ``TRITON_INTERPRET=1``, which is how CI tests the kernels without a GPU). An op without a
Triton kernel runs its reference under every choice.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

#: op name -> the folder (subpackage of gallop_kernels) that implements it
OPS = {
    "select_topk": "select_topk",
    "sparse_adamw_": "sparse_adamw",
    "sparse_adamw_step_": "sparse_adamw",
    "gather": "gather_scatter",
    "scatter_": "gather_scatter",
    "scatter_grouped_": "gather_scatter",
    "weight_grad_at": "weight_grad_at",
}
CHOICES = ("auto", "reference", "triton")


class InterpreterRequiredError(RuntimeError):
    """``GALLOP_BACKEND=triton`` on tensors that are not on a CUDA device, without Triton's interpreter: the
    compiled kernels can only launch on GPU memory. Set ``TRITON_INTERPRET=1`` before triton is first imported (how
    CI tests the kernels on the CPU), move the tensors to CUDA, or use ``GALLOP_BACKEND=reference``."""


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``; triton reads it when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else at import
        return False
    return True


@functools.cache
def has_triton_kernel(op: str) -> bool:
    """Whether ``op``'s folder has a ``triton.py`` (checked without importing triton)."""
    return importlib.util.find_spec(f"{__package__}.{OPS[op]}.triton") is not None


def _choice() -> str:
    choice = os.environ.get("GALLOP_BACKEND", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"GALLOP_BACKEND must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def backend(device: str | torch.device | None = None) -> str:
    """Name of the backend (``"triton"`` or ``"reference"``) that ops on tensors of ``device`` will use.

    With no ``device``, answers for the default accelerator: CUDA when available, else the CPU.
    """
    choice = _choice()
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not _triton_importable():
            raise RuntimeError(
                "GALLOP_BACKEND=triton but triton cannot be imported: install triton "
                "(Linux) or set GALLOP_BACKEND=reference"
            )
        return "triton"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "triton" if torch.device(device).type == "cuda" and _triton_importable() else "reference"


def _on_device(fn: Callable, device: torch.device, *args, **kwargs):
    with torch.cuda.device(device):
        return fn(*args, **kwargs)


def implementation(op: str, device: torch.device) -> Callable:
    """The function implementing ``op`` for tensors on ``device`` under the current backend choice.

    A Triton kernel launches on the current CUDA device, whatever its pointers say; so on CUDA the Triton function
    runs with ``device`` made current (tensors on ``cuda:1`` while ``cuda:0`` is current launch on ``cuda:1``)."""
    kind = "triton" if backend(device) == "triton" and has_triton_kernel(op) else "reference"
    if kind == "triton" and torch.device(device).type != "cuda" and not interpreting():
        raise InterpreterRequiredError(
            f"{op}: GALLOP_BACKEND=triton on {torch.device(device).type} tensors needs Triton's interpreter: set "
            f"TRITON_INTERPRET=1 before triton is imported, move the tensors to CUDA, or use GALLOP_BACKEND=reference"
        )
    fn = getattr(importlib.import_module(f"{__package__}.{OPS[op]}.{kind}"), op)
    if kind == "triton" and torch.device(device).type == "cuda":
        return functools.partial(_on_device, fn, torch.device(device))
    return fn
