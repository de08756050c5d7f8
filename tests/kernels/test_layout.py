"""Every op x every tensor argument x every memory layout, on both backends (issue 20).

Each argument is either read correctly through its layout (the result is bit-identical to the same backend's on
contiguous copies of the same values, and close to the reference's) or refused with a ``ValueError`` that names it
and ``.contiguous()``, leaving every tensor untouched. The ``K``-length arguments (``indices``, ``base``) and every
input of ``select_topk`` and ``weight_grad_at`` must be accepted in any layout (``gallop_kernels.api``'s rule).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

import gallop_kernels as gk

from .layouts import LAYOUTS, relayout

M, N, K, T = 5, 7, 9, 6


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(M * N, generator=g)[:K].sort().values
    return {
        "dense": torch.randn(M, N, generator=g),
        "dense_grad": torch.randn(M, N, generator=g),
        "indices": idx,
        "values": torch.randn(K, generator=g) * 0.1,
        "grad_k": torch.randn(K, generator=g),
        "base": torch.randn(K, generator=g).to(torch.bfloat16),
        "state_m": torch.randn(K, generator=g) * 0.01,
        "state_v": torch.rand(K, generator=g) * 0.01,
        "grad_output": torch.randn(T, M, generator=g),
        "input": torch.randn(T, N, generator=g),
        "w1": torch.randn(3, 4, generator=g),
        "g1": torch.randn(3, 4, generator=g),
    }


# op name -> (argument -> which input feeds it, call: args -> the tensors to compare (outputs and written tensors))
OPS: dict[str, tuple[dict[str, str], Callable[[dict], list[torch.Tensor]]]] = {
    "gather": ({"src": "dense", "indices": "indices"}, lambda a: [gk.gather(a["src"], a["indices"])]),
    "gather_into": (
        {"src": "dense", "indices": "indices", "out": "values"},
        lambda a: [gk.gather(a["src"], a["indices"], out=a["out"], accumulate=True)],
    ),
    "scatter_": (
        {"dst": "dense", "indices": "indices", "values": "values", "base": "base"},
        lambda a: [gk.scatter_(a["dst"], a["indices"], a["values"], base=a["base"]), a["dst"]][1:],
    ),
    "scatter_grouped_": (
        {"dsts[0]": "dense", "indices[0]": "indices", "values[0]": "values", "bases[0]": "base"},
        lambda a: [
            gk.scatter_grouped_([a["dsts[0]"]], [a["indices[0]"]], [a["values[0]"]], bases=[a["bases[0]"]]),
            a["dsts[0]"],
        ][1:],
    ),
    "sparse_adamw_": (
        {"param": "values", "grad": "grad_k", "exp_avg": "state_m", "exp_avg_sq": "state_v"},
        lambda a: [
            gk.sparse_adamw_(a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"], step=3, lr=0.1),
            a["param"],
            a["exp_avg"],
            a["exp_avg_sq"],
        ][1:],
    ),
    **{
        f"sparse_adamw_step_[{mode}]": (
            {
                "weight": "dense",
                "weight_grad": "dense_grad",
                "indices": "indices",
                "base": "base",
                "delta": "values",
                "exp_avg": "state_m",
                "exp_avg_sq": "state_v",
            },
            lambda a, mode=mode: [
                gk.sparse_adamw_step_(
                    a["weight"],
                    a["weight_grad"],
                    a["indices"],
                    a["base"],
                    a["delta"],
                    a["exp_avg"],
                    a["exp_avg_sq"],
                    step=2,
                    lr=0.05,
                    weight_decay=0.1,
                    nonfinite=mode,
                ),
                a["weight"],
                a["delta"],
                a["exp_avg"],
                a["exp_avg_sq"],
            ][1:],
        )
        for mode in ("skip", "assume_finite")
    },
    **{
        f"weight_grad_at[{path}]": (
            {"grad_output": "grad_output", "input": "input", "indices": "indices"},
            lambda a, path=path: [gk.weight_grad_at(a["grad_output"], a["input"], a["indices"], path=path)],
        )
        for path in ("dense", "sampled")
    },
    "select_topk": (
        {"grads[0]": "dense_grad", "grads[1]": "g1", "weights[0]": "dense", "weights[1]": "w1"},
        lambda a: gk.select_topk([a["grads[0]"], a["grads[1]"]], [a["weights[0]"], a["weights[1]"]], 11),
    ),
}
# torch's GEMM picks its kernel (and summation order) by layout: these agree within rounding, not bit for bit
BY_LAYOUT_ROUNDING = {"weight_grad_at[dense]", "weight_grad_at[sampled]"}
ALWAYS_ACCEPTED = {
    "indices",
    "base",
    "indices[0]",
    "bases[0]",
    "grad_output",
    "input",
    "grads[0]",
    "grads[1]",
    "weights[0]",
    "weights[1]",
}
CASES = [(op, arg) for op, (args, _) in OPS.items() for arg in args]


def _call(op: str, inputs: dict[str, torch.Tensor], backend: str):
    """The op's compared tensors, or the exception it raised, under ``backend``."""
    args, call = OPS[op]
    previous = os.environ.get("GALLOP_BACKEND")
    os.environ["GALLOP_BACKEND"] = backend
    try:
        return [t.clone() for t in call({name: inputs[name] for name in args})]
    except (ValueError, TypeError) as e:
        return e
    finally:
        os.environ["GALLOP_BACKEND"] = previous or "auto"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("op", "arg"), CASES, ids=[f"{op}-{arg}" for op, arg in CASES])
def test_every_argument_in_every_layout(backend, op, arg, layout):
    args, _ = OPS[op]
    source = _inputs()
    feed = {name: source[key].clone() for name, key in args.items()}
    feed[arg] = relayout(feed[arg], layout)

    def plain() -> dict[str, torch.Tensor]:  # the same values, contiguous: a fresh copy per call
        return {name: t.contiguous().clone() for name, t in feed.items()}

    before = plain()
    expected = _call(op, plain(), backend)
    oracle = _call(op, plain(), "reference")
    got = _call(op, feed, backend)
    if isinstance(expected, Exception):  # e.g. an expanded index tensor is all duplicates: refused either way
        assert isinstance(got, type(expected)), f"{op} raised {expected!r} on contiguous inputs but gave {got!r}"
        return
    if isinstance(got, Exception):
        assert arg not in ALWAYS_ACCEPTED, f"{op} refused {arg} as {layout}: {got}"
        assert isinstance(got, ValueError) and arg in str(got) and ".contiguous()" in str(got), repr(got)
        for name, t in feed.items():
            assert torch.equal(t, before[name]), f"{op} wrote {name} before refusing {arg}"
        return
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if op in BY_LAYOUT_ROUNDING:
            torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-6)
        else:
            assert torch.equal(g, e), f"{op} with {arg} {layout} differs from the same values contiguous"
    for g, e in zip(got, oracle):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-6)


def test_a_contiguous_copy_is_made_only_for_short_arguments(backend):
    """The rule's other half: the weight-sized arguments are refused, never copied behind the caller's back."""
    w = relayout(torch.randn(M, N), "transposed")
    with pytest.raises(ValueError, match=r"src must be contiguous.*src\.contiguous\(\)"):
        gk.gather(w, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"dst must be contiguous.*dst\.contiguous\(\)"):
        gk.scatter_(w, torch.tensor([0, 1]), torch.zeros(2))
    state = [torch.zeros(2) for _ in range(4)]
    with pytest.raises(ValueError, match=r"weight_grad must be contiguous"):
        gk.sparse_adamw_step_(torch.zeros(M, N), w, torch.tensor([0, 1]), *state, step=1, lr=0.1)
