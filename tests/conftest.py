"""Shared fixtures. Kernel tests run once per backend: the reference, and the Triton kernels (on CPU tensors
through Triton's interpreter, so CI tests them without a GPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before any @triton.jit runs


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="no triton"))]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test under GALLOP_BACKEND=reference and =triton."""
    monkeypatch.setenv("GALLOP_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
