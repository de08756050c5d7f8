"""mean_gradients: the mean signed gradient, per example or per batch, in every accumulator mode, in one pass or
in slices (the identical selection)."""

import itertools

import pytest
import torch

from gallop import GallopConfig, GradientCandidates, eligible_parameters, mean_gradients, select
from gallop.calibrate import calibration_subset, slice_plan

from ..models import random_batches, tiny


# ------------------------------------------------------------------------------------------------ mean_gradients
def _labels_of_uneven_length(batches):
    """Give the examples different numbers of answer tokens, so per-example and token-weighted means differ."""
    for b in batches:
        for r in range(b["labels"].shape[0]):
            b["labels"][r, : 3 + 2 * r] = -100
    return batches


def _hand_mean(model, names, losses):
    """The mean over ``losses`` (a list of callables) of each loss's gradient."""
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(params[n]) for n in names}
    for loss in losses:
        model.zero_grad(set_to_none=True)
        loss().backward()
        for n in names:
            want[n] += params[n].grad
    model.zero_grad(set_to_none=True)
    return {n: w / len(losses) for n, w in want.items()}


def test_per_example_mean_is_the_papers_mean():
    """reduction='example': (1/N) sum_n grad L_n, L_n each example's own mean token loss."""
    model = tiny("llama")
    batches = _labels_of_uneven_length(random_batches(2, batch=3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = mean_gradients(model, batches, progress=False)

    names = list(eligible_parameters(model))
    assert list(grads) == names
    model.eval()
    examples = [{k: v[r : r + 1] for k, v in b.items()} for b in batches for r in range(3)]
    want = _hand_mean(model, names, [lambda e=e: model(**e).loss for e in examples])
    for n in names:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-5, atol=1e-8)
        assert grads[n].dtype == torch.float32
    # the model is untouched: weights, flags, grads, mode
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n]
    assert not model.training


def test_batch_mean_is_the_mean_of_batch_losses():
    """reduction='batch' (gallop 0.1): the mean over batches of model(**batch).loss, token-weighted in a batch."""
    model = tiny("llama")
    batches = _labels_of_uneven_length(random_batches(3, batch=3))
    grads = mean_gradients(model, batches, reduction="batch", progress=False)
    names = list(eligible_parameters(model))
    want = _hand_mean(model, names, [lambda b=b: model(**b).loss for b in batches])
    for n in names:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-5, atol=1e-8)
    per_example = mean_gradients(model, batches, progress=False)
    assert any(not torch.allclose(per_example[n], grads[n]) for n in names)  # the two definitions differ


@pytest.mark.parametrize("accumulate", ["bf16", "cpu"])
def test_low_memory_accumulators(accumulate):
    model = tiny("llama")
    batches = random_batches(4)
    want = mean_gradients(model, batches, progress=False)
    got = mean_gradients(model, batches, accumulate=accumulate, progress=False)
    for n, w in want.items():
        assert got[n].dtype == torch.float32 and got[n].device == w.device
        if accumulate == "cpu":
            torch.testing.assert_close(got[n], w, rtol=1e-6, atol=1e-9)
        else:  # bf16 sums: each partial sum rounded (stochastically) to 8 bits of mantissa
            scale = float(w.abs().max())
            torch.testing.assert_close(got[n] / scale, w / scale, rtol=0, atol=4 * 2**-8)
    again = mean_gradients(model, batches, accumulate=accumulate, progress=False)
    assert all(torch.equal(again[n], got[n]) for n in got)  # seeded: reproducible


def test_mean_gradients_bf16_model_accumulates_fp32():
    model = tiny("llama", dtype=torch.bfloat16)
    grads = mean_gradients(model, random_batches(2), progress=False)
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())


def test_mean_gradients_max_batches_and_custom_loss():
    model = tiny("llama")
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return m(**batch).logits.float().pow(2).mean((1, 2))  # one loss per example

    grads = mean_gradients(model, iter(random_batches(5)), loss_fn=loss_fn, max_batches=2, progress=False)
    assert len(calls) == 2 and all(torch.isfinite(g).all() for g in grads.values())
    with pytest.raises(ValueError, match="one loss per example"):
        mean_gradients(model, random_batches(1), loss_fn=lambda m, b: m(**b).loss, progress=False)


def test_mean_gradients_errors_restore_model():
    model = tiny("llama")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="batches is empty"):
        mean_gradients(model, [], progress=False)
    with pytest.raises(ValueError, match="max_batches must be"):
        mean_gradients(model, random_batches(1), max_batches=0, progress=False)

    def nan_loss(m, batch):
        return m(**batch).loss * float("nan")

    with pytest.raises(ValueError, match="loss of calibration batch 0 is nan"):
        mean_gradients(model, random_batches(1), loss_fn=nan_loss, reduction="batch", progress=False)
    with pytest.raises(ValueError, match="reduction must be one of"):
        mean_gradients(model, random_batches(1), reduction="token", progress=False)
    with pytest.raises(ValueError, match="accumulate must be one of"):
        mean_gradients(model, random_batches(1), accumulate="fp16", progress=False)
    no_answer = random_batches(1)
    no_answer[0]["labels"][1] = -100
    with pytest.raises(ValueError, match="has no answer tokens"):
        mean_gradients(model, no_answer, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_calibration_subset():
    idx = calibration_subset(1000, 0.05, seed=3)
    assert len(idx) == 50 and idx == sorted(set(idx)) and idx == calibration_subset(1000, 0.05, seed=3)
    assert idx != calibration_subset(1000, 0.05, seed=4)
    assert calibration_subset(3, 0.01) and len(calibration_subset(10, 1.0)) == 10
    with pytest.raises(ValueError, match="fraction"):
        calibration_subset(10, 0.0)


# ------------------------------------------------------------------------------------------------ slices
def _model_with_ties():
    """A tiny Llama whose layer 0 o_proj and down_proj are zero: the gradients of layer 0's q/k/v/gate/up are then
    exactly zero (6,144 entries of score 0, all tied), and o_proj/down_proj have |w| = 0 (score |g| / eps)."""
    model = tiny("llama")
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize(
    "budget, accumulate, reduction",
    [
        ("global", "fp32", "example"),
        ("global", "bf16", "example"),
        ("global", "cpu", "batch"),
        ("per_tensor", "fp32", "batch"),
        ("per_tensor", "bf16", "example"),
    ],
)
def test_slices_give_the_one_pass_selection_bit_for_bit(budget, accumulate, reduction):
    """S = 2 and 7 select exactly what one pass selects, ties included: at density 0.8 the threshold falls inside
    the 6,144 entries of score 0, whose tie order (tensor, flat index) must survive the slicing."""
    model = _model_with_ties()
    batches = random_batches(3)
    config = GallopConfig(density=0.8, budget=budget)
    kw = dict(accumulate=accumulate, reduction=reduction, max_batches=2, progress=False)
    dense = mean_gradients(model, batches, config, **kw)
    names = list(dense)
    zero = sum(int((dense[n] == 0).sum()) for n in names)
    assert zero >= 6144  # the adversarial ties are there
    want = select(model, dense, config)
    for slices in (2, 7):
        candidates = mean_gradients(model, batches, config, slices=slices, **kw)
        assert isinstance(candidates, GradientCandidates) and len(candidates.slices) == slices
        assert [n for part in candidates.slices for n in part] == names  # contiguous, in the eligible order
        got = select(model, candidates, config)
        assert list(got) == list(want)
        for n in want:
            assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
        for n in names:  # the candidates carry the one-pass mean gradient, bit for bit
            at = candidates.indices[n].long()
            assert torch.equal(candidates.values[n], dense[n].reshape(-1)[at])
    # one slice per weight at most: slices above the number of eligible weights
    candidates = mean_gradients(model, batches, config, slices=10**6, **kw)
    assert len(candidates.slices) <= len(names)
    got = select(model, candidates, config)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_slices_are_the_smallest_largest_contiguous_cut():
    """slice_plan against every contiguous cut into at most S groups (brute force on small lists)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        numels = torch.randint(1, 9, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
        for slices in range(1, len(numels) + 2):
            plan = slice_plan(numels, slices)
            assert [i for r in plan for i in r] == list(range(len(numels))) and len(plan) <= slices
            best = min(
                max(sum(numels[a:b]) for a, b in zip((0, *cuts), (*cuts, len(numels))))
                for m in range(min(slices, len(numels)))
                for cuts in itertools.combinations(range(1, len(numels)), m)
            )
            assert max(sum(numels[i] for i in r) for r in plan) == best, (numels, slices)


class _Reshuffled:
    """An iterable that yields its batches in another order every time (as a shuffling DataLoader does)."""

    def __init__(self, batches):
        self.batches, self.epoch = batches, 0

    def __iter__(self):
        self.epoch += 1
        return iter(self.batches[self.epoch % len(self.batches) :] + self.batches[: self.epoch % len(self.batches)])


def test_slices_errors_restore_model():
    model = tiny("llama")
    flags = [p.requires_grad for p in model.parameters()]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises((ValueError, TypeError), match="slices must be"):
            mean_gradients(model, random_batches(1), slices=bad, progress=False)
    with pytest.raises(TypeError, match="one-shot iterator .* slices=2 reads it once per slice"):
        mean_gradients(model, (b for b in random_batches(2)), slices=2, progress=False)
    with pytest.raises(ValueError, match="other batches in pass 2 than in pass 1"):
        mean_gradients(model, _Reshuffled(random_batches(3)), slices=2, progress=False)
    with pytest.raises(ValueError, match="scorer 'random' reads no gradients"):
        mean_gradients(model, random_batches(1), GallopConfig(scorer="random"), slices=2, progress=False)
    with pytest.raises(ValueError, match="density=1e-06 selects 0"):  # the budget is checked before any pass
        mean_gradients(model, random_batches(1), GallopConfig(density=1e-6), slices=2, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        mean_gradients(model, [], slices=2, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
