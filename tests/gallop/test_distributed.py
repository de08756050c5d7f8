"""torch.distributed: calibration averages over ranks (every rank selects the same set, in one pass or in
slices), DDP all-reduces only the deltas' gradients (2 ranks on half batches = 1 process on the full batch), and
mismatched selections raise.

Two CPU processes with the gloo backend, spawned once per kernel backend; every scenario runs in that one spawn.
"""

import gc
import os

import pytest
import torch
import torch.distributed as dist

from gallop import GallopConfig, SparseAdamW, SparseModel, mean_gradients, select

from ..models import random_batches, tiny
from .helpers import adam_tol, spawn_ranks

pytestmark = pytest.mark.usefixtures("backend")

WORLD = 2
LR = 1e-2
DEADLINE_S = 300  # both ranks together take about 20 s; a hang fails the test instead of stalling CI


def _calibration():
    return random_batches(4, batch=2, seed=1)


def _training():
    return random_batches(3, batch=4, seed=2)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = {}
        model = tiny("llama")
        cfg = GallopConfig(density=0.05)
        grads = mean_gradients(model, _calibration()[rank::world], cfg, progress=False)  # this rank's shard
        sel = select(model, grads, cfg)
        result["selection"] = {n: i.clone() for n, i in sel.items()}
        sliced = select(model, mean_gradients(model, _calibration()[rank::world], cfg, progress=False, slices=3), cfg)
        result["sliced"] = {n: i.clone() for n, i in sliced.items()}  # each slice's sums all-reduced
        sparse = SparseModel(model, sel)
        ddp = torch.nn.parallel.DistributedDataParallel(sparse)
        opt = SparseAdamW(sparse, lr=LR)
        sent = []
        ddp.register_comm_hook(
            None,
            lambda state, bucket: (
                sent.append(bucket.buffer().numel()),
                dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future().then(lambda f: f.value()[0]),
            )[1],
        )
        for batch in _training():
            half = {k: v.chunk(world)[rank] for k, v in batch.items()}
            ddp(**half).loss.backward()
            opt.step()
            opt.zero_grad()
        result["deltas"] = [p.detach().clone() for p in sparse.parameters()]
        result["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        result["sent_per_step"] = sum(sent) / len(_training())

        # a rank-dependent selection must be refused on every rank, before the model is touched
        other = tiny("llama")
        bad = select(other, None, GallopConfig(density=0.05, scorer="random", seed=rank))
        try:
            SparseModel(other, bad)
            result["mismatch"] = None
        except RuntimeError as e:
            result["mismatch"] = str(e)
        result["other_untouched"] = all(p.requires_grad for p in other.parameters())
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        # Tear DDP down while the process group is alive. Otherwise the reducer, freed when this function returns,
        # drops the group's last reference and gloo's destructor joins a worker thread that waits for the GIL
        # this thread holds: a deadlock (seen with the Python comm hook above).
        del ddp, opt, sparse
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    spawn_ranks(_worker, (WORLD, str(tmp_path / "store"), str(tmp_path)), WORLD, DEADLINE_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # one process on all the data
    model = tiny("llama")
    cfg = GallopConfig(density=0.05)
    sel = select(model, mean_gradients(model, _calibration(), cfg, progress=False), cfg)
    for r in ranks:  # every rank selected exactly what one process selects on the union of the shards
        assert list(r["selection"]) == list(sel)
        assert all(torch.equal(r["selection"][n], sel[n]) for n in sel)
        assert list(r["sliced"]) == list(sel) and all(torch.equal(r["sliced"][n], sel[n]) for n in sel)
    sparse = SparseModel(model, sel)
    opt = SparseAdamW(sparse, lr=LR)
    for batch in _training():
        sparse(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for r in ranks:
        for a, b in zip(r["deltas"], sparse.parameters()):
            torch.testing.assert_close(a, b.detach(), **adam_tol(LR, len(_training())))
    # the ranks agree with each other exactly (they applied the same all-reduced gradient)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["deltas"], ranks[1]["deltas"]))
    # DDP communicated k numbers per step, not the model
    assert ranks[0]["sent_per_step"] == sel.num_selected
    for r in ranks:
        assert r["mismatch"] is not None and "different GaLLoP selections" in r["mismatch"]
        assert r["other_untouched"]
