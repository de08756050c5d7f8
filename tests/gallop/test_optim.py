"""SparseAdamW: torch.optim.AdamW's math over the deltas in one fused launch; non-finite steps are skipped."""

import copy
import warnings

import pytest
import torch

from gallop import SparseAdamW, SparseModel

from ..models import random_batches
from .helpers import adam_tol, setup, train, twins

pytestmark = pytest.mark.usefixtures("backend")


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_matches_torch_adamw_over_the_same_parameters(weight_decay):
    s1, m1, s2, m2 = twins()
    batches = random_batches(6, seed=2)
    train(s1, SparseAdamW(s1, lr=1e-2, weight_decay=weight_decay), batches)
    train(
        s2, torch.optim.AdamW(s2.parameters(), lr=1e-2, weight_decay=weight_decay, fused=False, foreach=False), batches
    )
    s2.sync()
    for a, b in zip(s1.parameters(), s2.parameters()):
        torch.testing.assert_close(a, b, **adam_tol(1e-2, 6))
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, **adam_tol(1e-2, 6), msg=n)


def test_param_groups_and_params_without_grad_match_torch():
    """Two groups with their own lr; a tensor without a gradient is skipped (no decay, no moment update)."""
    s1, m1, s2, m2 = twins()
    d1, d2 = s1.trainable_parameters(), s2.trainable_parameters()
    o1 = SparseAdamW([{"params": d1[:3], "lr": 1e-2}, {"params": d1[3:]}], lr=3e-3, weight_decay=0.1)
    o2 = torch.optim.AdamW(
        [{"params": d2[:3], "lr": 1e-2}, {"params": d2[3:]}], lr=3e-3, weight_decay=0.1, foreach=False
    )
    for step, b in enumerate(random_batches(4, seed=8)):
        for s, o in ((s1, o1), (s2, o2)):
            s(**b).loss.backward()
            if step == 2:
                s.trainable_parameters()[4].grad = None
            o.step()
            o.zero_grad()
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b, **adam_tol(1e-2, 4))


def test_clipping_matches_clip_grad_norm():
    s1, m1, s2, m2 = twins()
    batches = random_batches(3, seed=1)
    train(s1, SparseAdamW(s1, lr=1e-2, max_grad_norm=0.1), batches)
    o2 = torch.optim.AdamW(s2.parameters(), lr=1e-2, foreach=False)
    for b in batches:
        s2(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(s2.parameters(), 0.1)
        o2.step()
        o2.zero_grad()
    for a, b in zip(s1.parameters(), s2.parameters()):
        torch.testing.assert_close(a, b, **adam_tol(1e-2, 3))


def test_scheduler_and_state_dict_round_trip():
    s1, m1, s2, m2 = twins()
    opt = SparseAdamW(s1, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(s1, opt, random_batches(2))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    # a fresh optimizer on a twin, loaded from the state dict, continues identically
    s2.load_state_dict(s1.state_dict())
    opt2 = SparseAdamW(s2, lr=1.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3)
    more = random_batches(2, seed=9)
    train(s1, opt, more)
    train(s2, opt2, more)
    for a, b in zip(s1.parameters(), s2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_step(bad):
    model, sel = setup()
    sparse = SparseModel(model, sel)
    opt = SparseAdamW(sparse, lr=1e-2)
    train(sparse, opt, random_batches(1))
    deltas = [p.detach().clone() for p in sparse.parameters()]
    moments = [
        (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["step"])
        for p in sparse.parameters()
    ]
    weights = [p.detach().clone() for p in model.parameters()]
    sparse(**random_batches(1, seed=3)[0]).loss.backward()
    sparse.trainable_parameters()[2].grad[5] = bad
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(deltas, sparse.parameters()))
    for (m, v, st), p in zip(moments, sparse.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["exp_avg_sq"], v)
        assert opt.state[p]["step"] == st
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(sparse, opt, random_batches(1, seed=4))  # the next finite step trains normally
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nonfinite_gradient_can_raise():
    model, sel = setup()
    sparse = SparseModel(model, sel)
    opt = SparseAdamW(sparse, lr=1e-2, nonfinite="raise")
    sparse(**random_batches(1)[0]).loss.backward()
    sparse.trainable_parameters()[0].grad[0] = float("nan")
    before = [p.detach().clone() for p in sparse.parameters()]
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, sparse.parameters()))


def test_bad_arguments():
    model, sel = setup()
    sparse = SparseModel(model, sel)
    with pytest.raises(ValueError, match="lr must be"):
        SparseAdamW(sparse, lr=-1)
    with pytest.raises(ValueError, match="betas must be"):
        SparseAdamW(sparse, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="max_grad_norm must be"):
        SparseAdamW(sparse, max_grad_norm=0)
    with pytest.raises(ValueError, match="nonfinite must be"):
        SparseAdamW(sparse, nonfinite="ignore")
    with pytest.raises(ValueError, match="step_in_backward was removed"):
        SparseAdamW(sparse, step_in_backward=True)
    with pytest.raises(TypeError, match="contiguous fp32"):
        SparseAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    import numpy as np

    opt = SparseAdamW(sparse, lr=np.float32(1e-3), weight_decay=torch.tensor(0.01))  # numpy / 0-d tensor scalars
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_eps_zero_is_refused_before_it_can_divide_zero_by_zero():
    """Issue 20: SparseAdamW(eps=0) was accepted, and an entry whose gradient is exactly 0 got 0/0 = NaN, which
    the write-back (trusting SparseAdamW's finite deltas) put into 12 of the model's weights."""
    model, sel = setup()
    sparse = SparseModel(model, sel)
    with pytest.raises(ValueError, match=r"eps must be in \(0, inf\]"):
        SparseAdamW(sparse, eps=0)
    with pytest.raises(ValueError, match=r"param_group\['eps'\] must be in \(0, inf\]"):
        SparseAdamW([{"params": sparse.trainable_parameters(), "eps": 0.0}])
