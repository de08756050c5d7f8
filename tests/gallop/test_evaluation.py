"""Accuracy by the log-likelihood of each choice and generative exact match, on a tiny random Llama and on a model
whose replies are fixed."""

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
