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
    assert _registry.implementation("weight_grad_at", "cpu").__module__ == "gallop_kernels.weight_grad_at.reference"


def test_triton_on_cpu_tensors_without_the_interpreter_is_a_clear_error(monkeypatch):
    """What a CUDA machine's test run meets on CPU tensors: a named error (the conftest turns it into a skip)."""
    import torch

    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(gk.InterpreterRequiredError, match=r"gather: GALLOP_BACKEND=triton on cpu tensors needs"):
        gk.gather(torch.zeros(4), torch.tensor([1]))
    monkeypatch.setenv("GALLOP_BACKEND", "reference")
    assert gk.gather(torch.arange(4.0), torch.tensor([1])).tolist() == [1.0]


def test_triton_kernels_launch_under_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the registry makes the tensors' device current for the call."""
    import contextlib

    import torch

    pytest.importorskip("triton")
    if not _registry.interpreting():
        pytest.skip("runs a Triton kernel on CPU tensors: needs TRITON_INTERPRET=1")
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    fn = _registry.implementation("gather", torch.device("cuda:1"))
    src = torch.arange(6.0)
    assert fn(src, torch.tensor([4, 1]), out=None, accumulate=False).tolist() == [4.0, 1.0]  # the interpreter
    assert entered == [torch.device("cuda:1")]
    assert _registry.implementation("gather", torch.device("cpu")).__module__.endswith(".triton")  # no wrapper
