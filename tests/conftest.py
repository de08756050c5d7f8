"""Shared fixtures. Kernel tests run once per backend: the reference, and the Triton kernels (on CPU tensors
through Triton's interpreter, so CI tests them without a GPU). Every test runs with the library's uninitialized
allocations filled with garbage, so code that reads memory it never wrote fails instead of passing by luck.

On a CUDA machine (or with ``GALLOP_TESTS_WITHOUT_INTERPRETER=1``, how ``bench/gpu_check.py --rehearsal`` plays
one on the CPU) the interpreter is off, so the Triton kernels compile for the GPU. A test that runs them on CPU
tensors then meets ``gallop_kernels.InterpreterRequiredError`` and is reported as skipped with that reason, not
failed: it ran, under the interpreter, in CI. Tests on CUDA tensors (the ``device`` fixture, ``-m gpu``) run the
compiled kernels."""

import os
import sys

import pytest
import torch

WITHOUT_INTERPRETER = torch.cuda.is_available() or os.environ.get("GALLOP_TESTS_WITHOUT_INTERPRETER") == "1"
if not WITHOUT_INTERPRETER:
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


def _garbage(t: torch.Tensor) -> torch.Tensor:
    if t.numel():
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.uint8 else 0xA5)
    return t


def _from_library() -> bool:
    name = sys._getframe(2).f_globals.get("__name__", "")
    return name.startswith(("gallop.", "gallop_kernels."))


@pytest.fixture(autouse=True)
def garbage_in_empty(monkeypatch):
    """``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` called from gallop or gallop_kernels return
    tensors full of NaN (floats), True (bools) or the dtype's maximum (integers)."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def wrap(fn):
        def allocate(*args, **kwargs):
            t = fn(*args, **kwargs)
            return _garbage(t) if _from_library() else t

        return allocate

    monkeypatch.setattr(torch, "empty", wrap(empty))
    monkeypatch.setattr(torch, "empty_like", wrap(empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", wrap(new_empty))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without the interpreter, a test that ran the Triton kernels on CPU tensors is a skip (see the docstring)."""
    outcome = yield
    if not WITHOUT_INTERPRETER or call.excinfo is None:
        return
    from gallop_kernels import InterpreterRequiredError

    def needs_interpreter(error: BaseException | None) -> bool:
        group = getattr(error, "exceptions", None)  # an exception group (hypothesis's distinct failures): all of them
        if isinstance(group, (list, tuple)) and group:
            return all(needs_interpreter(e) for e in group)
        while error is not None and not isinstance(error, InterpreterRequiredError):
            error = error.__cause__ or error.__context__
        return error is not None

    if needs_interpreter(call.excinfo.value):
        report = outcome.get_result()
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "Skipped: needs TRITON_INTERPRET=1 (CPU tensors)")
