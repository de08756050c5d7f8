"""Backend registration and choice (GALLOP_BACKEND)."""

import pytest

import gallop_kernels as gk
from gallop_kernels import _registry


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("GALLOP_BACKEND", "reference")
    assert gk.backend("cuda") == "reference"
    monkeypatch.setenv("GALLOP_BACKEND", "auto")
    assert gk.backend("cpu") == "reference"
    monkeypatch.setenv("GALLOP_BACKEND", "fast")
    with pytest.raises(ValueError, match="GALLOP_BACKEND must be one of"):
        gk.backend()


def test_every_op_has_a_reference_and_ops_without_triton_use_it(monkeypatch):
    import importlib

    for op, folder in _registry.OPS.items():
        assert callable(getattr(importlib.import_module(f"gallop_kernels.{folder}.reference"), op))
    assert not _registry.has_triton_kernel("weight_grad_at")
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    assert _registry.implementation("weight_grad_at", "cpu").__module__ == "gallop_kernels.weight_grad.reference"
