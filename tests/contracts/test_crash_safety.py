"""Covers gallop.adapters.format.

Adapter saves survive kills and races: a SIGKILL at any point of a save (deterministically at every step boundary,
and 20 times at random moments) leaves the folder loadable as the old or the new adapter; concurrent writers are
serialized and readers never see a mix."""

import os
import random
import signal
import time

import pytest
import torch

from gallop.adapters import AdapterTensor, read_adapter, write_adapter
from gallop.adapters import format as adapters

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _tensors(version: int) -> list[AdapterTensor]:
    gen = torch.Generator().manual_seed(version)
    out = []
    for i, n in enumerate((300, 17, 1000)):
        idx = torch.sort(torch.randperm(5000, generator=gen)[:n]).values
        out.append(
            AdapterTensor(
                f"layer.{i}.weight", (50, 100), torch.bfloat16, idx, torch.randn(n, generator=gen).to(torch.bfloat16)
            )
        )
    return out


def _save(directory, version: int) -> None:
    config = {"gallop_config": {"density": 0.01}, "base_fingerprint": "x" * 64, "metrics": {"version": version}}
    write_adapter(directory, _tensors(version), config, model_card=f"version {version}\n")


def _loaded_version(directory) -> int:
    adapter = read_adapter(directory)
    version = adapter.config["metrics"]["version"]
    for got, want in zip(adapter.tensors, _tensors(version)):  # the tensors belong to the version the config says
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    return version


# the calls a save makes that touch the file system: a kill right before any of them is a step boundary
_STEPS = [
    (os, "replace"),
    (os, "fsync"),
    (os, "chmod"),
    (os, "close"),
    (adapters, "save_file"),
    (adapters.tempfile, "mkstemp"),
]


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:  # the child: run, never return into pytest
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def _save_killed_at(directory, version: int, kill_at: int) -> bool:
    """Save in a child process that SIGKILLs itself right before its ``kill_at``-th file-system call; returns
    whether the kill happened (False: the save completed first)."""

    def child():
        count = [0]
        for module, name in _STEPS:
            original = getattr(module, name)

            def wrapped(*a, _original=original, **kw):
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                count[0] += 1
                return _original(*a, **kw)

            setattr(module, name, wrapped)
        _save(directory, version)

    _, status = os.waitpid(_fork(child), 0)
    return os.WIFSIGNALED(status)


def test_a_kill_at_every_step_boundary_leaves_old_or_new(tmp_path):
    folder = tmp_path / "a"
    _save(folder, 1)
    boundaries = 0
    while _save_killed_at(folder, 2, boundaries):
        assert _loaded_version(folder) in (1, 2), boundaries
        boundaries += 1
        _save(folder, 1)  # back to the old adapter for the next kill point
    assert boundaries >= 10  # every call of the save was a kill point
    assert _loaded_version(folder) == 2  # the last run completed
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # a later save cleared the killed ones


def test_twenty_kills_at_random_moments(tmp_path):
    folder = tmp_path / "a"
    _save(folder, 1)
    rng = random.Random(20261129)
    seen = set()
    for _ in range(20):

        def child():
            v = 2
            while True:
                _save(folder, v)
                v = 3 - v

        pid = _fork(child)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(_loaded_version(folder))
    assert seen <= {1, 2} and seen


def test_concurrent_writers_are_serialized_and_readers_never_see_a_mix(tmp_path):
    folder = tmp_path / "a"
    _save(folder, 1)

    def writer(version):
        def run():
            for _ in range(15):
                _save(folder, version)

        return run

    alive = {_fork(writer(2)), _fork(writer(3))}
    versions = set()
    deadline = time.time() + 60
    while alive and time.time() < deadline:
        alive = {p for p in alive if os.waitpid(p, os.WNOHANG) == (0, 0)}
        versions.add(_loaded_version(folder))  # raises if a read ever mixed two saves
    for p in alive:
        os.kill(p, signal.SIGKILL)
        os.waitpid(p, 0)
    assert not alive, "the writers did not finish within a minute"
    assert versions <= {1, 2, 3}
    assert _loaded_version(folder) in (2, 3)
