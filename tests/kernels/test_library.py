"""The training-path ops as torch.library custom ops: schema/fake checks, and torch.compile without graph breaks."""

import torch

import gallop_kernels as gk
from gallop_kernels import gather_scatter, sparse_adamw
from gallop_kernels.weight_grad_at import weight_grad_at_op


def _adamw_args(n=33):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)]


def test_opcheck_all_ops():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 7, generator=gen)
    idx = torch.tensor([0, 3, 9, 41], dtype=torch.int64)
    torch.library.opcheck(sparse_adamw.sparse_adamw_op, (*_adamw_args(), 1, 1e-3, 0.9, 0.999, 1e-8, 0.01))
    torch.library.opcheck(gather_scatter.gather_op, (w, idx))
    torch.library.opcheck(gather_scatter.gather_into_op, (w, idx, torch.zeros(4), True))
    torch.library.opcheck(gather_scatter.scatter_op, (w.clone(), idx, torch.randn(4, generator=gen), None))
    base = torch.randn(4, generator=gen)
    torch.library.opcheck(gather_scatter.scatter_op, (w.clone(), idx, torch.randn(4, generator=gen), base))
    grouped = (
        [w.clone(), torch.randn(5, generator=gen).to(torch.bfloat16)],
        [idx, torch.tensor([0, 4], dtype=torch.int32)],
    )
    grouped_values = [torch.randn(4, generator=gen), torch.randn(2, generator=gen)]
    torch.library.opcheck(gather_scatter.scatter_grouped_op, (*grouped, grouped_values, []))
    torch.library.opcheck(gather_scatter.scatter_grouped_op, (*grouped, grouped_values, [base, torch.randn(2)]))
    step_args = (
        w.clone(),
        torch.randn(6, 7, generator=gen),
        idx,
        torch.randn(4),
        torch.zeros(4),
        torch.zeros(4),
        torch.zeros(4),
        1,
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.0,
    )
    torch.library.opcheck(sparse_adamw.sparse_adamw_step_op, step_args)
    torch.library.opcheck(
        weight_grad_at_op,
        (torch.randn(5, 6, generator=gen), torch.randn(5, 7, generator=gen), idx, "sampled"),
    )


def test_compiled_step_has_no_graph_break():
    """A compiled optimizer step calling the public ops traces as one graph and matches eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(8, 9, generator=gen)
    idx = torch.tensor([1, 5, 20, 70], dtype=torch.int64)
    base = gk.gather(w, idx)

    def step(w, dense_grad, delta, m, v):
        g = gk.gather(dense_grad, idx)
        gk.sparse_adamw_(delta, g, m, v, step=1, lr=1e-2)
        gk.scatter_(w, idx, delta, base=base)
        return delta.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grad = torch.randn(8, 9, generator=gen)
    w_e, w_c = w.clone(), w.clone()
    st_e = [torch.zeros(4) for _ in range(3)]
    st_c = [torch.zeros(4) for _ in range(3)]
    step(w_e, grad, *st_e)
    compiled(w_c, grad, *st_c)
    assert torch.equal(w_e, w_c) and all(torch.equal(a, b) for a, b in zip(st_e, st_c))


def test_compiled_grouped_write_back_has_no_graph_break():
    """scatter_grouped_ (the write-back after a step) traces as one graph under torch.compile and matches eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(6, 7, generator=gen), torch.randn(5, generator=gen).to(torch.bfloat16)]
    idx = [torch.tensor([1, 5, 20, 41]), torch.tensor([0, 3], dtype=torch.int32)]
    bases = [gk.gather(w, i) for w, i in zip(weights, idx)]

    def write_back(ws, deltas):
        gk.scatter_grouped_(ws, idx, deltas, bases=bases)
        return deltas[0].sum()

    compiled = torch.compile(write_back, fullgraph=True, backend="aot_eager")
    deltas = [torch.randn(4, generator=gen), torch.randn(2, generator=gen)]
    eager_w, compiled_w = [w.clone() for w in weights], [w.clone() for w in weights]
    write_back(eager_w, deltas)
    compiled(compiled_w, deltas)
    assert all(torch.equal(a, b) for a, b in zip(eager_w, compiled_w))
    assert not torch.equal(eager_w[0], weights[0])


def test_eager_path_skips_dispatcher(monkeypatch):
    """Outside torch.compile the ops call their implementation directly (no custom-op dispatch cost)."""
    called = []
    monkeypatch.setattr(sparse_adamw, "sparse_adamw_op", lambda *a: called.append(a))
    gk.sparse_adamw_(*_adamw_args(), step=1, lr=1e-3)
    assert not called
