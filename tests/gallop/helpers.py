"""Helpers shared by the gallop tests: tiny models with a selection, twins, a reference training loop."""

from __future__ import annotations

import torch

from gallop import GallopConfig, SparseAdamW, SparseModel, mean_gradients, select

from ..models import random_batches, tiny


def peft_has_supertuning() -> bool:
    """Whether the installed peft has Supertuning (peft >= 0.21), which the PEFT export writes."""
    import peft

    return hasattr(peft, "SupertuningConfig")


def weights(model) -> dict:
    """The model's own parameters by name (without the ``gallop_delta`` parameters a SparseModel adds)."""
    return {n: p for n, p in model.named_parameters() if not n.endswith("gallop_delta")}


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in weights(model).items()}


def changed_entries(model, before: dict) -> int:
    return sum(int((p.detach() != before[n]).sum()) for n, p in weights(model).items())


def setup(arch="llama", density=0.05, dtype=torch.float32, scorer="gallop", seed=0, **config):
    """A tiny model and a selection on it."""
    model = tiny(arch, dtype=dtype, seed=seed)
    cfg = GallopConfig(density=density, scorer=scorer, **config)
    grads = mean_gradients(model, random_batches(2), cfg, progress=False) if cfg.uses_gradients else None
    return model, select(model, grads, cfg)


def twins(**kw):
    """Two identical tiny models wrapped with one selection: (sparse_1, model_1, sparse_2, model_2)."""
    m1, sel = setup(**kw)
    m2 = tiny(kw.get("arch", "llama"), dtype=kw.get("dtype", torch.float32), seed=kw.get("seed", 0))
    return SparseModel(m1, sel), m1, SparseModel(m2, sel), m2


def split(batch, n):
    if n == 1:
        return [batch]
    return [{k: v.chunk(n)[i] for k, v in batch.items()} for i in range(n)]


def train(model, opt, batches, accumulate=1):
    """loss.backward (split into ``accumulate`` micro-batches), opt.step, opt.zero_grad per batch."""
    for b in batches:
        for part in split(b, accumulate):
            (model(**part).loss / accumulate).backward()
        opt.step()
        opt.zero_grad()


def tol(dtype):
    """rtol/atol for comparing results that torch computes in ``dtype`` without a bitwise promise."""
    eps = torch.finfo(dtype).eps
    return dict(rtol=64 * eps, atol=64 * eps)


def adam_tol(lr: float, steps: int, dtype=torch.float32):
    """Tolerance for fp32 parameters after ``steps`` Adam updates whose gradients agree only to ``dtype`` rounding.

    Each Adam update is normalized (about ``lr`` in size, ``lr * g / eps`` where ``g`` is near ``eps``), so gradient
    rounding differences move an entry by a fraction of ``lr`` per step rather than by a fraction of its value: the
    updates must agree to 1/1024 of their size, ``1024 * eps`` relative.
    """
    eps = torch.finfo(dtype).eps
    return dict(rtol=1024 * eps, atol=lr * steps / 1024)


def trained(dtype=torch.float32, lr=1e-2, steps=3):
    """A tiny model with a selection, trained a few steps: (model, selection, sparse model)."""
    model, sel = setup(dtype=dtype)
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=lr), random_batches(steps))
    return model, sel, sparse


def saved_adapter(tmp_path, budget="per_tensor", dtype=torch.float32):
    """A tiny Llama trained at a random 10% selection, its adapter saved to ``tmp_path / "adapter"``:
    (model, sparse model)."""
    model = tiny("llama", dtype=dtype)
    sel = select(model, None, GallopConfig(density=0.1, scorer="random", budget=budget))
    sparse = SparseModel(model, sel)
    train(sparse, SparseAdamW(sparse, lr=1e-2), random_batches(3))
    sparse.save_pretrained(tmp_path / "adapter")
    return model, sparse


def enable_checkpointing(model, reentrant: bool = False) -> None:
    """Gradient checkpointing on a transformers model, under either release's name for it."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def spawn_ranks(worker, args: tuple, world: int, deadline_s: float = 300) -> None:
    """Run ``worker(rank, *args)`` on ``world`` processes; a hang in torch.distributed fails the test after
    ``deadline_s`` instead of stalling CI (the ranks are killed)."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} ranks did not finish within {deadline_s} s (a hang in torch.distributed)")
