"""sparse_adamw_ and the fused sparse_adamw_step_ against torch.optim.AdamW and the reference, on both backends."""

import pytest
import torch

import gallop_kernels as gk
from gallop_kernels.sparse_adamw import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sparse_adamw_matches_torch_over_50_steps(backend, device, n, weight_decay):
    gen = torch.Generator().manual_seed(n)
    init = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * (10.0 ** (i % 5 - 2)) for i in range(50)]
    ref = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, foreach=False)
    p = init.clone().to(device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step, g in enumerate(grads, 1):
        ref.grad = g.clone()
        opt.step()
        gk.sparse_adamw_(
            p, g.to(device), m, v, step=step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay
        )
    tol = 1e-6 * float(ref.detach().abs().max())
    assert float((p.cpu() - ref.detach()).abs().max()) <= tol


def test_sparse_adamw_zero_length(backend, device):
    e = torch.empty(0, device=device)
    gk.sparse_adamw_(e, e.clone(), e.clone(), e.clone(), step=1, lr=1e-3)


def test_sparse_adamw_zero_grad_and_huge_values(backend, device):
    p = torch.tensor([0.0, 1e30, -1e-30, 3.0], device=device)
    g = torch.tensor([0.0, 1e20, -1e-20, 0.0], device=device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ref_p, ref_m, ref_v = p.clone().cpu(), m.clone().cpu(), v.clone().cpu()
    gk.sparse_adamw_(p, g, m, v, step=1, lr=1e-3, weight_decay=0.01)
    reference.sparse_adamw_(ref_p, g.cpu(), ref_m, ref_v, step=1, lr=1e-3, weight_decay=0.01)
    for a, b in ((p, ref_p), (m, ref_m), (v, ref_v)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_step_equals_unfused(backend, device, dtype):
    """State matches the reference AdamW to fp32 rounding; the weight holds exactly cast(base + delta)."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(37, 19, generator=gen).to(dtype).to(device)
    idx = torch.sort(torch.randperm(w.numel(), generator=gen)[:101]).values.to(device)
    base = w.reshape(-1)[idx].clone()
    state = [torch.zeros(101, device=device) for _ in range(3)]
    ref_w, ref_state = w.clone(), [s.clone() for s in state]
    for step in range(1, 6):
        wg = torch.randn(37, 19, generator=gen).to(dtype).to(device)
        gk.sparse_adamw_step_(w, wg, idx, base, *state, step=step, lr=1e-2, weight_decay=0.1)
        g = wg.reshape(-1)[idx].float()
        reference.sparse_adamw_(ref_state[0], g, ref_state[1], ref_state[2], step=step, lr=1e-2, weight_decay=0.1)
        for a, b in zip(state, ref_state):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        ref_w.view(-1)[idx] = (base.float() + state[0]).to(dtype)  # exactly the kernel's own delta, rounded once
        assert torch.equal(w, ref_w)


def _bufs(n=4):
    return [torch.zeros(n) for _ in range(4)]


def test_adamw_bad_step():
    with pytest.raises(ValueError, match="step must be >= 1"):
        gk.sparse_adamw_(*_bufs(), step=0, lr=1e-3)
    with pytest.raises(TypeError, match="step must be an int"):
        gk.sparse_adamw_(*_bufs(), step=1.0, lr=1e-3)


def test_adamw_length_mismatch_modifies_nothing():
    p, g, m, v = _bufs()
    v = torch.zeros(5)
    p.fill_(1.0)
    with pytest.raises(ValueError, match="exp_avg_sq has length 5 but param has length 4"):
        gk.sparse_adamw_(p, g, m, v, step=1, lr=1e-3)
    assert torch.equal(p, torch.ones(4))


def test_adamw_wrong_dtype_and_shape():
    p, g, m, v = _bufs()
    with pytest.raises(TypeError, match="grad must be float32"):
        gk.sparse_adamw_(p, g.bfloat16(), m, v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="param must be 1-D"):
        gk.sparse_adamw_(p.reshape(2, 2), g, m, v, step=1, lr=1e-3)
    with pytest.raises(TypeError, match="floating dtype"):
        gk.sparse_adamw_(p.int(), g, m, v, step=1, lr=1e-3)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"lr": -1.0}, "lr must be"),
        ({"beta1": 1.0}, "beta1 must be in"),
        ({"beta2": -0.1}, "beta2 must be in"),
        ({"eps": float("nan")}, "eps must be"),
        ({"weight_decay": -0.1}, "weight_decay must be"),
    ],
)
def test_adamw_bad_hparams(kw, msg):
    args = {"lr": 1e-3, **kw}
    with pytest.raises(ValueError, match=msg):
        gk.sparse_adamw_(*_bufs(), step=1, **args)


def test_fused_step_shape_mismatch():
    w = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="weight_grad has shape"):
        gk.sparse_adamw_step_(
            w,
            torch.zeros(16),
            torch.tensor([0]),
            torch.zeros(1),
            torch.zeros(1),
            torch.zeros(1),
            torch.zeros(1),
            step=1,
            lr=1e-3,
        )
