"""mean_gradients: the mean signed gradient, per example or per batch, in every accumulator mode."""

import pytest
import torch

from gallop import eligible_parameters, mean_gradients
from gallop.calibrate import calibration_subset

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
