"""Covers gallop_kernels.api (every op, both backends).

No op reads or writes outside its tensors, whatever the indices; bad indices, aliased buffers and non-finite
values are refused before anything is written. Both backends (the Triton kernels through the interpreter)."""

import pytest
import torch

import gallop_kernels as gk

BAD_INDICES = {"past_the_end": [0, 3, 12], "negative": [-1, 2], "huge": [0, 10**6]}


def _neighbourhood(n=12, dtype=torch.float32):
    """A dst of n elements inside a bigger buffer, so a write past its end would land in the guard zone."""
    buf = torch.zeros(n + 8, dtype=dtype)
    return buf, buf[4 : 4 + n]


@pytest.mark.parametrize("kind", BAD_INDICES)
def test_out_of_range_indices_raise_before_writing(backend, kind):
    buf, dst = _neighbourhood()
    idx = torch.tensor(BAD_INDICES[kind])
    vals = torch.ones(idx.numel())
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\)"):
        gk.scatter_(dst, idx, vals)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\)"):
        gk.gather(dst, idx)
    state = [torch.zeros(idx.numel()) for _ in range(4)]
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\)"):
        gk.sparse_adamw_step_(dst, torch.ones_like(dst), idx, state[0], *state[1:], step=1, lr=0.1)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\)"):
        gk.weight_grad_at(torch.ones(2, 3), torch.ones(2, 4), idx)
    assert torch.equal(buf, torch.zeros_like(buf)) and all(torch.equal(s, torch.zeros_like(s)) for s in state)


@pytest.mark.parametrize("kind", BAD_INDICES)
def test_unchecked_triton_kernels_stay_inside_their_tensors(monkeypatch, kind):
    """check_indices=False skips the sync; the kernels still mask what lies outside (the reference raises)."""
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    buf, dst = _neighbourhood()
    idx = torch.tensor(BAD_INDICES[kind])
    gk.scatter_(dst, idx, torch.full((idx.numel(),), 7.0), check_indices=False)
    assert torch.equal(buf[:4], torch.zeros(4)) and torch.equal(buf[-4:], torch.zeros(4))
    got = gk.gather(dst, idx, check_indices=False)
    assert torch.isfinite(got).all()
    state = [torch.zeros(idx.numel()) for _ in range(4)]
    gk.sparse_adamw_step_(dst, torch.ones_like(dst), idx, state[0], *state[1:], step=1, lr=0.1, check_indices=False)
    assert torch.equal(buf[:4], torch.zeros(4)) and torch.equal(buf[-4:], torch.zeros(4))
    monkeypatch.setenv("GALLOP_BACKEND", "reference")
    with pytest.raises((IndexError, RuntimeError)):
        gk.scatter_(dst, idx, torch.ones(idx.numel()), check_indices=False)


@pytest.mark.parametrize("idx", [[1, 1], [5, 2, 5]])
def test_duplicate_indices_raise(backend, idx):
    dst = torch.zeros(8)
    with pytest.raises(ValueError, match="duplicates"):
        gk.scatter_(dst, torch.tensor(idx), torch.ones(len(idx)))
    assert torch.equal(dst, torch.zeros(8))
    gk.scatter_(dst, torch.tensor([5, 2, 0]), torch.tensor([1.0, 2.0, 3.0]))  # unsorted but unique is fine
    assert dst.tolist() == [3.0, 0, 2.0, 0, 0, 1.0, 0, 0]


def test_aliased_buffers_raise(backend):
    p, g, m = torch.zeros(4), torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq share memory"):
        gk.sparse_adamw_(p, g, m, m, step=1, lr=0.1)
    with pytest.raises(ValueError, match="param and grad share memory"):
        gk.sparse_adamw_(p, p, m, torch.zeros(4), step=1, lr=0.1)
    src = torch.arange(8.0)
    with pytest.raises(ValueError, match="out and src share memory"):
        gk.gather(src, torch.tensor([0, 1]), out=src[:2])
    buf = torch.zeros(8)
    with pytest.raises(ValueError, match="dst and values share memory"):
        gk.scatter_(buf, torch.tensor([0, 1]), buf[6:])
    assert torch.equal(src, torch.arange(8.0)) and torch.equal(buf, torch.zeros(8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skip_raise_or_assume(backend, bad):
    p, m, v = torch.ones(5), torch.zeros(5), torch.zeros(5)
    g = torch.ones(5)
    g[2] = bad
    with pytest.warns(RuntimeWarning, match="skipped"):
        gk.sparse_adamw_(p, g, m, v, step=1, lr=0.1)
    assert torch.equal(p, torch.ones(5)) and torch.equal(m, torch.zeros(5)) and torch.equal(v, torch.zeros(5))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        gk.sparse_adamw_(p, g, m, v, step=1, lr=0.1, nonfinite="raise")
    assert torch.equal(p, torch.ones(5))
    w = torch.zeros(3, 4)
    idx = torch.tensor([1, 6])
    wg = torch.zeros(3, 4)
    wg.view(-1)[6] = bad
    state = [torch.zeros(2) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="skipped"):
        gk.sparse_adamw_step_(w, wg, idx, torch.zeros(2), *state, step=1, lr=0.1)
    assert torch.equal(w, torch.zeros(3, 4)) and all(torch.equal(s, torch.zeros(2)) for s in state)
    gk.sparse_adamw_(p, g, m, v, step=1, lr=0.1, nonfinite="assume_finite")  # unchecked: torch's semantics
    assert not torch.isfinite(p).all()


def test_scatter_refuses_an_fp16_overflow(backend):
    dst = torch.zeros(4, dtype=torch.float16)
    idx = torch.tensor([0, 2])
    with pytest.warns(RuntimeWarning, match="nothing was written"):
        gk.scatter_(dst, idx, torch.tensor([1.0, 7e4]))
    assert torch.equal(dst, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(FloatingPointError, match="float16"):
        gk.scatter_(dst, idx, torch.tensor([1.0, 1e5]), base=torch.ones(2), nonfinite="raise")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        gk.scatter_(dst, idx, torch.ones(2), nonfinite="ignore")


def test_numeric_arguments_accept_numpy_and_tensor_scalars(backend):
    import numpy as np

    p, g, m, v = torch.ones(3), torch.ones(3), torch.zeros(3), torch.zeros(3)
    gk.sparse_adamw_(p, g, m, v, step=np.int64(1), lr=np.float32(0.1), beta1=torch.tensor(0.9), weight_decay=0)
    assert torch.all(p < 1)
    with pytest.raises(TypeError, match="lr must be a real number"):
        gk.sparse_adamw_(p, g, m, v, step=1, lr="0.1")
    with pytest.raises(TypeError, match="step must be an int"):
        gk.sparse_adamw_(p, g, m, v, step=np.float32(1.0), lr=0.1)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_the_fused_step_refuses_an_fp16_overflow(backend, nonfinite):
    """Issue 20: a base of 65500 and lr=100 wrote +inf into the fp16 weight. Now: nothing changes, and it says so."""
    w = torch.full((3, 4), 65500.0, dtype=torch.float16)
    idx = torch.tensor([1, 6])
    base, delta, m, v = w.view(-1)[idx].clone(), torch.zeros(2), torch.zeros(2), torch.zeros(2)
    before = [t.clone() for t in (w, delta, m, v)]
    wg = torch.full((3, 4), -1.0, dtype=torch.float16)
    if nonfinite == "skip":
        with pytest.warns(RuntimeWarning, match="float16.*lower the learning rate"):
            gk.sparse_adamw_step_(w, wg, idx, base, delta, m, v, step=1, lr=100.0)
    else:
        with pytest.raises(FloatingPointError, match="float16"):
            gk.sparse_adamw_step_(w, wg, idx, base, delta, m, v, step=1, lr=100.0, nonfinite="raise")
    assert all(torch.equal(a, b) for a, b in zip((w, delta, m, v), before))
    gk.sparse_adamw_step_(w, wg, idx, base, delta, m, v, step=1, lr=1.0)  # a step that fits goes through
    assert torch.isfinite(w).all() and torch.equal(w.view(-1)[idx], (base.float() + delta).half())


def test_eps_must_be_positive(backend):
    """Issue 20: eps=0 let 0/0 = NaN into the buffers (an entry whose gradient is exactly 0)."""
    p, g, m, v = torch.ones(3), torch.tensor([0.0, 1.0, 0.0]), torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"eps must be in \(0"):
        gk.sparse_adamw_(p, g, m, v, step=1, lr=0.1, eps=0.0)
    w = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"eps must be in \(0"):
        gk.sparse_adamw_step_(w, w.clone(), torch.tensor([0, 4]), *[torch.zeros(2) for _ in range(4)], step=1,
                              lr=0.1, eps=0)  # fmt: skip
    assert torch.equal(p, torch.ones(3)) and torch.equal(m, torch.zeros(3))


def test_both_backends_refuse_to_write_a_tensor_that_requires_grad(backend):
    """Issue 20: the reference raised (torch's in-place rule) and the Triton path wrote. Now both refuse, alike,
    and both work under no_grad."""
    idx = torch.tensor([0, 2])
    leaf = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match=r"dst requires grad.*torch\.no_grad\(\)"):
        gk.scatter_(leaf, idx, torch.ones(2))
    with pytest.raises(ValueError, match="out requires grad"):
        gk.gather(torch.ones(4), idx, out=torch.zeros(2, requires_grad=True))
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="param requires grad"):
        gk.sparse_adamw_(p, torch.ones(2), torch.zeros(2), torch.zeros(2), step=1, lr=0.1)
    with pytest.raises(ValueError, match="weight requires grad"):
        gk.sparse_adamw_step_(leaf, torch.ones(4), idx, torch.zeros(2), *[torch.zeros(2) for _ in range(3)],
                              step=1, lr=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="delta requires grad"):
        gk.sparse_adamw_step_(torch.zeros(4), torch.ones(4), idx, torch.zeros(2), p, torch.zeros(2),
                              torch.zeros(2), step=1, lr=0.1)  # fmt: skip
    assert torch.equal(leaf, torch.zeros(4)) and torch.equal(p, torch.zeros(2))
    with torch.no_grad():
        gk.scatter_(leaf, idx, torch.ones(2))
        gk.sparse_adamw_(p, torch.ones(2), torch.zeros(2), torch.zeros(2), step=1, lr=0.1)
    assert torch.equal(leaf.detach(), torch.tensor([1.0, 0, 1, 0])) and bool((p < 0).all())
