"""Accuracy by the log-likelihood of each choice and generative exact match, on a tiny random Llama and on a model
whose replies are fixed."""

import inspect

import pytest
import torch
from torch import nn

from gallop.data import Example
from gallop.evaluation import accuracy, choice_logprobs, exact_match

from ..models import llama


class _Tok:
    """Printable ASCII and newline, one token per character (code - 32; newline is 95), a 96-token vocabulary."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [95 if c == "\n" else ord(c) - 32 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\n" if int(i) == 95 else chr(int(i) + 32) for i in ids)


TOK = _Tok()
EXAMPLES = [
    Example("Question: 2+2?\nAnswer:", ("4", "5", "twenty"), 0),
    Example("Is it hot?", ("yes", "no"), 1),
    Example("Pick:", ("a", "bb"), 0, sep=""),
]


def _by_hand(model, prompt: str, choice: str, sep: str) -> float:
    ids = TOK(prompt + sep + choice)["input_ids"]
    n_prompt = len(TOK(prompt)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))


def test_choice_logprobs_sum_the_choice_tokens_in_padded_batches():
    model = llama()
    got = choice_logprobs(model, TOK, EXAMPLES, batch_size=2)  # batches mix lengths: right padding is masked
    want = [[_by_hand(model, ex.prompt, c, ex.sep) for c in ex.choices] for ex in EXAMPLES]
    assert [len(g) for g in got] == [3, 2, 2]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)


MANY = [
    *EXAMPLES,
    Example("Which animal barks?\nA. cat\nB. dog\nC. cow\nD. hen\nAnswer:", ("A", "B", "C", "D"), 1),
    Example("Finish: the sky is", ("blue", "green and wide", "x", "a very long continuation here"), 0),
    Example("Q", ("it", "is"), 0, sep=""),  # the choices differ from their first token: nothing beyond "Q" shared
    Example("Same start:", ("ab", "ac", "abc"), 2),
]


class _NoCache(nn.Module):
    """A causal LM wrapper whose forward takes no ``past_key_values``: scored by running every full row."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_shared_prompt_scoring_equals_running_each_full_row(batch_size):
    model = llama()
    calls: list[bool] = []
    forward = model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("past_key_values", kwargs.get("cache")) is not None)
        return forward(*args, **kwargs)

    model.forward = spy  # records whether a cache came in; the signature stays the original's
    model.forward.__signature__ = inspect.signature(forward)
    got = choice_logprobs(model, TOK, MANY, batch_size=batch_size)
    want = [[_by_hand(model, ex.prompt, c, ex.sep) for c in ex.choices] for ex in MANY]
    tol = 64 * torch.finfo(torch.float32).eps * max(abs(v) for w in want for v in w)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=tol)
    assert any(calls)  # the cached path ran (choices after a shared prompt)
    plain = _NoCache(model)
    for g, w in zip(choice_logprobs(plain, TOK, MANY, batch_size=batch_size), want):
        assert g == pytest.approx(w, abs=tol)
    assert plain.calls > 0


def test_accuracy_counts_the_highest_likelihood_choice_and_keeps_the_mode():
    model = llama()
    model.train()
    scores = choice_logprobs(model, TOK, EXAMPLES)
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    worst = [min(range(len(s)), key=s.__getitem__) for s in scores]
    right = [Example(ex.prompt, ex.choices, b, ex.sep) for ex, b in zip(EXAMPLES, best)]
    wrong = [Example(ex.prompt, ex.choices, w, ex.sep) for ex, w in zip(EXAMPLES, worst)]
    assert accuracy(model, TOK, right) == 1.0
    assert accuracy(model, TOK, wrong) == 0.0
    assert accuracy(model, TOK, [right[0], wrong[1]], batch_size=1) == 0.5
    assert model.training  # evaluation ran in eval mode and put the model back
    assert accuracy(model, TOK, []) == 0.0


class _Replying(nn.Module):
    """A 'model' whose greedy continuation of each prompt is a fixed reply; it records what generate received."""

    def __init__(self, replies: dict[str, str]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # the device comes from the parameters
        self.replies = replies
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids, attention_mask, kwargs))
        prompts = [TOK.decode(row[mask.bool()]) for row, mask in zip(input_ids, attention_mask)]
        replies = [TOK(self.replies[p])["input_ids"] for p in prompts]
        width = max(len(r) for r in replies)
        tail = torch.zeros((len(replies), width), dtype=torch.long)
        for r, reply in enumerate(replies):
            tail[r, : len(reply)] = torch.tensor(reply)
        return torch.cat([input_ids, tail], dim=1)


def test_exact_match_parses_the_first_line_of_greedy_output():
    examples = [
        Example("Capital of France?", ("Rome", "Paris"), 1),
        Example("Capital of Italy, please?", ("Rome", "Paris"), 0),
        Example("Opposite of hot?", ("cold", "warm"), 0),
    ]
    replies = {
        "Capital of France?": " PARIS.\nQuestion: more",  # case and final punctuation do not matter
        "Capital of Italy, please?": " Paris",  # wrong
        "Opposite of hot?": "  cold!",
    }
    model = _Replying(replies)
    assert exact_match(model, TOK, examples, batch_size=2) == pytest.approx(2 / 3)
    ids, mask, kwargs = model.calls[0]
    assert len(model.calls) == 2 and kwargs["do_sample"] is False
    assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # left padding: every prompt ends at the edge
