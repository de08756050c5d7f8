"""Covers gallop_kernels.api (select_topk, gather, scatter_, sparse_adamw_, weight_grad_at) and gallop.adapters.format
(the gap code).

Property tests (hypothesis, derandomized so every run draws the same cases): random shapes, dtypes, tie-heavy
data, k at the edges, and inputs in every memory layout the API accepts (``layouts.py``). The two backends agree
exactly where the contract says exact (selection, gather, scatter, the gap code) and within the dtype's tolerance
elsewhere (AdamW, weight_grad_at)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gallop_kernels as gk
from gallop.adapters import decode_gaps, encode_gaps

from ..kernels.layouts import LAYOUTS, relayout
from ..kernels.oracle import brute_force_topk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _both(monkeypatch, fn):
    out = {}
    for name in ("reference", "triton"):
        monkeypatch.setenv("GALLOP_BACKEND", name)
        out[name] = fn()
    return out["reference"], out["triton"]


def _tensor(shape, kind, dtype, gen):
    if kind == "normal":
        t = torch.randn(shape, generator=gen)
    elif kind == "ties":
        t = torch.randint(-2, 3, shape, generator=gen).float()
    elif kind == "zeros":
        t = torch.zeros(shape)
    else:  # huge and tiny magnitudes
        t = torch.randn(shape, generator=gen) * 10 ** torch.randint(-6, 6, shape, generator=gen).float()
    return t.clamp(-6e4, 6e4).to(dtype)


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["normal", "ties", "zeros", "wide"]),
    scorer=st.sampled_from(list(gk.SCORERS)),
    k_at=st.sampled_from(["one", "all", "middle"]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_select_topk_equals_the_oracle_on_both_backends(monkeypatch, sizes, dtype, kind, scorer, k_at, layout, seed):
    total = sum(sizes)
    if total == 0:
        sizes = [*sizes, 3]
        total = 3
    gen = torch.Generator().manual_seed(seed)
    weights = [_tensor((n,), kind, dtype, gen) for n in sizes]
    grads = [_tensor((n,), "normal", dtype, gen) for n in sizes]
    if scorer == "gallop" and kind == "zeros":
        grads = [g.clamp(-1e-3, 1e-3) for g in grads]  # |g| / eps must stay finite
    weights = [relayout(w, layout) for w in weights]
    grads = [relayout(g, layout) for g in grads]
    k = {"one": 1, "all": total, "middle": max(1, total // 2)}[k_at]
    g_in = grads if gk.SCORERS[scorer] else None
    ref, tri = _both(monkeypatch, lambda: gk.select_topk(g_in, weights, k, scorer=scorer, seed=seed))
    want = brute_force_topk(grads, weights, k, scorer=scorer, seed=seed)
    for a, b, w in zip(ref, tri, want):
        assert torch.equal(a, b) and torch.equal(a.long(), w)


@SETTINGS
@given(n=st.integers(0, 3000), steps=st.integers(1, 4), wd=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_sparse_adamw_backends_agree(monkeypatch, n, steps, wd, seed):
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(n, generator=gen)
    grads = [
        torch.randn(n, generator=gen) * 10.0 ** float(torch.randint(-3, 3, (1,), generator=gen)) for _ in range(steps)
    ]

    def run():
        p, m, v = init.clone(), torch.zeros(n), torch.zeros(n)
        for t, g in enumerate(grads, 1):
            gk.sparse_adamw_(p, g, m, v, step=t, lr=1e-2, weight_decay=wd)
        return p, m, v

    ref, tri = _both(monkeypatch, run)
    eps = torch.finfo(torch.float32).eps
    for a, b in zip(ref, tri):  # FMA contraction and the lerp form differ: a few ulps of the buffer's scale
        scale = float(a.abs().max()) if a.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=16 * eps, atol=16 * eps * scale)


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    frac=st.floats(0.0, 1.0),
    with_base=st.booleans(),
    layout=st.sampled_from([x for x in LAYOUTS if x != "expanded"]),  # an expanded index tensor repeats: refused
    seed=st.integers(0, 2**16),
)
def test_gather_and_scatter_are_exact_on_both_backends(monkeypatch, shape, dtype, frac, with_base, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    src = _tensor(tuple(shape), "wide", dtype, gen)
    n = src.numel()
    idx = torch.sort(torch.randperm(n, generator=gen)[: int(frac * n)]).values
    values = torch.randn(idx.numel(), generator=gen) * 1e-2
    base = relayout(src.reshape(-1)[idx], layout) if with_base else None
    idx = relayout(idx, layout)

    def run():
        dst = src.clone()
        gk.scatter_(dst, idx, values, base=base, nonfinite="assume_finite")
        return gk.gather(src, idx), dst

    (g_ref, d_ref), (g_tri, d_tri) = _both(monkeypatch, run)
    assert torch.equal(g_ref, g_tri) and torch.equal(g_ref, src.reshape(-1)[idx].float())
    assert torch.equal(d_ref, d_tri)


@SETTINGS
@given(
    tokens=st.integers(0, 12),
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from([x for x in LAYOUTS if x != "expanded"]),
    seed=st.integers(0, 2**16),
)
def test_weight_grad_at_matches_the_dense_gradient(tokens, m, n, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    dy = relayout(torch.randn(tokens, m, generator=gen).to(dtype), layout)
    x = relayout(torch.randn(tokens, n, generator=gen).to(dtype), layout)
    idx = relayout(torch.sort(torch.randperm(m * n, generator=gen)[: max(1, m * n // 2)]).values, layout)
    want = (dy.float().t() @ x.float()).reshape(-1)[idx]
    eps = torch.finfo(dtype).eps
    scale = float((dy.float().abs().t() @ x.float().abs()).max()) if tokens else 1.0
    torch.testing.assert_close(gk.weight_grad_at(dy, x, idx), want, rtol=0, atol=4 * eps * scale + 1e-30)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(idx=st.sets(st.integers(0, 2**33), max_size=60))
def test_gap_code_round_trip(idx):
    t = torch.tensor(sorted(idx), dtype=torch.int64)
    code = encode_gaps(t)
    assert code.dtype == torch.uint16
    assert torch.equal(decode_gaps(code), t)


def test_property_tests_run_both_backends():
    pytest.importorskip("triton")
