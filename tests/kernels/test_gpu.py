"""GPU-only tests at realistic sizes (``pytest -m gpu``; ``make gpu-check`` runs them with the kernel tests)."""

import pytest
import torch

import gallop_kernels as gk
from gallop_kernels.select_topk import reference
from gallop_kernels.sparse_adamw import reference as adamw_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SCORERS = ["gallop", "gradient", "magnitude", "product", "random"]


def _both(monkeypatch, fn):
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    a = fn()
    monkeypatch.setenv("GALLOP_BACKEND", "reference")
    b = fn()
    return a, b


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("kind", ["normal", "quantized"])
def test_select_large_identical_to_reference(monkeypatch, scorer, kind):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096, 4096), (1000,), (3, 5), (11008, 1024), (1,)]
    if kind == "normal":
        ws = [(torch.randn(s, device="cuda", generator=gen) * 0.02).bfloat16() for s in shapes]
        gs = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    else:  # heavy ties across blocks and tensors
        ws = [torch.randint(-3, 4, s, device="cuda", generator=gen).bfloat16() for s in shapes]
        gs = [torch.randint(-3, 4, s, device="cuda", generator=gen).float() for s in shapes]
    total = sum(w.numel() for w in ws)
    grads = None if scorer in ("magnitude", "random") else gs
    for k in (1, total // 100, total // 3):
        a, b = _both(monkeypatch, lambda k=k: gk.select_topk(grads, ws, k, scorer=scorer))
        assert sum(x.numel() for x in a) == k
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_select_llama8b_shapes_exact_and_memory():
    """226 LLaMA3-8B-shaped tensors (8.03e9 elements, beyond int32 and beyond torch.topk): exact k, every selected
    score >= every unselected one on sampled tensors, and the peak extra memory."""
    from bench.shapes import llama8b_inputs, llama8b_shapes, peak_extra_memory

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = llama8b_shapes()
    grads, weights = llama8b_inputs("cuda", gen)
    total = sum(w.numel() for w in weights)
    assert total > 2**32
    k = total // 100
    out, extra = peak_extra_memory(lambda: gk.select_topk(grads, weights, k))
    out_bytes = sum(o.numel() * o.element_size() for o in out)
    print(f"\nLLaMA3-8B selection: peak extra {extra / 2**30:.2f} GiB, output {out_bytes / 2**30:.2f} GiB")
    assert sum(o.numel() for o in out) == k

    # the threshold: the smallest selected score over all tensors
    def score(i):
        return reference.scores(grads[i], weights[i], "gallop")

    thr = min(float(score(i).reshape(-1)[out[i].long()].min()) for i in range(len(shapes)) if out[i].numel())
    for i in (0, 1, 5, 100, 225):
        s = score(i).reshape(-1)
        chosen = torch.zeros_like(s, dtype=torch.bool)
        chosen[out[i].long()] = True
        if out[i].numel():
            assert float(s[chosen].min()) >= thr
        assert float(s[~chosen].max()) <= thr
        assert torch.all(out[i][1:] > out[i][:-1])
    assert extra - out_bytes <= 2**30


def test_optimizer_kernels_large(monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(1)
    k = 10**7
    p, g = torch.randn(k, device="cuda", generator=gen), torch.randn(k, device="cuda", generator=gen)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ref = [t.clone() for t in (p, m, v)]
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    for step in (1, 2, 3):
        gk.sparse_adamw_(p, g, m, v, step=step, lr=1e-3, weight_decay=0.1)
        adamw_reference.sparse_adamw_(ref[0], g, ref[1], ref[2], step=step, lr=1e-3, weight_decay=0.1)
    for a, b in zip((p, m, v), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fused_step_and_scatter_large(monkeypatch, dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    n, k = 1 << 26, 1 << 19
    w = (torch.randn(n, device="cuda", generator=gen) * 0.02).to(dtype)
    wg = (torch.randn(n, device="cuda", generator=gen) * 1e-3).to(dtype)
    idx = torch.sort(torch.randperm(n, device="cuda", generator=gen)[:k]).values.to(torch.int32)
    base = w[idx.long()].clone()
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    assert torch.equal(gk.gather(wg, idx), wg[idx.long()].float())
    state = [torch.zeros(k, device="cuda") for _ in range(3)]
    w_ref, state_ref = w.clone(), [s.clone() for s in state]
    gk.sparse_adamw_step_(w, wg, idx, base, *state, step=1, lr=1e-3)
    adamw_reference.sparse_adamw_step_(w_ref, wg, idx, base, *state_ref, step=1, lr=1e-3)
    for a, b in zip(state, state_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    want = w_ref.clone()
    want[idx.long()] = (base.float() + state[0]).to(dtype)  # the kernel's own delta, rounded once
    assert torch.equal(w, want)
    gk.scatter_(w, idx, state[0], base=None)
    assert torch.equal(w[idx.long()], state[0].to(dtype))


def test_one_tensor_above_2_to_the_31_elements(monkeypatch):
    """Offsets past int32 inside one tensor (issue 16): selection returns int64 indices that reach the tail, and
    gather / scatter_ / the fused step address it, on the compiled kernels."""
    n = (1 << 31) + 4099
    w = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    planted = torch.tensor([7, (1 << 31) - 1, 1 << 31, n - 1], device="cuda")
    w[planted] = 0.0  # the four smallest magnitudes
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    (idx,) = gk.select_topk(None, [w], 4, scorer="magnitude")
    assert idx.dtype == torch.int64 and torch.equal(idx, planted)
    values = torch.tensor([1.5, 2.5, 3.5, 4.5], device="cuda")
    gk.scatter_(w, idx, values)
    assert torch.equal(gk.gather(w, idx), values) and float(w[8]) == 1.0
    wg = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    wg[planted] = 1.0
    state = [torch.zeros(4, device="cuda") for _ in range(3)]
    base = gk.gather(w, idx)
    gk.sparse_adamw_step_(w, wg, idx, base, *state, step=1, lr=0.25)
    assert torch.equal(gk.gather(w, idx), values - 0.25) and float(w[n - 2]) == 1.0
