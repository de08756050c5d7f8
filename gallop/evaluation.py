"""Evaluating a causal language model on ``gallop.data.Example`` lists: multiple-choice accuracy by the
log-likelihood of each choice (summed, or length-normalized as lm-eval's ``acc_norm``), and generative exact match
(greedy decoding, the answer parsed from the output)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from .data import Example, encode, pad_id
from .progress import progress_bar


@torch.no_grad()
def choice_logprobs(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "evaluate",
) -> list[list[float]]:
    """Sum of the log-probabilities of each choice's tokens given the prompt, per example and choice."""
    pairs = []
    for e, ex in enumerate(examples):
        for c, choice in enumerate(ex.choices):
            row, n_prompt = encode(tokenizer, ex.prompt, choice, ex.sep)
            pairs.append((e, c, row, n_prompt))
    out = [[0.0] * len(ex.choices) for ex in examples]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in progress_bar(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = pairs[i : i + batch_size]
            width = max(len(p[2]) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (_, _, row, _) in enumerate(chunk):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:].to(device)
            tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            for r, (e, c, row, n_prompt) in enumerate(chunk):
                out[e][c] = float(tok_lp[r, n_prompt - 1 : len(row) - 1].sum())
    finally:
        model.train(was_training)
    return out


def accuracy(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "evaluate",
) -> float:
    """Fraction of examples whose highest-likelihood choice is the right one."""
    scores = choice_logprobs(model, tokenizer, examples, batch_size=batch_size, progress=progress, desc=desc)
    right = sum(int(max(range(len(s)), key=s.__getitem__) == ex.label) for s, ex in zip(scores, examples))
    return right / max(1, len(examples))


def normalized_predictions(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "evaluate",
) -> list[int]:
    """The chosen option per example by length-normalized log-likelihood (lm-eval's ``acc_norm``): each choice's
    summed log-probability divided by the UTF-8 byte length of its continuation (``sep + choice``); ties go to the
    first choice."""
    scores = choice_logprobs(model, tokenizer, examples, batch_size=batch_size, progress=progress, desc=desc)
    out = []
    for s, ex in zip(scores, examples):
        norm = [v / max(1, len((ex.sep + c).encode())) for v, c in zip(s, ex.choices)]
        out.append(max(range(len(norm)), key=norm.__getitem__))
    return out


def normalized_accuracy(
    model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 32, progress: bool = False
) -> float:
    """Fraction of examples whose choice by length-normalized log-likelihood (``acc_norm``) is the right one."""
    preds = normalized_predictions(model, tokenizer, examples, batch_size=batch_size, progress=progress)
    return sum(int(p == ex.label) for p, ex in zip(preds, examples)) / max(1, len(examples))


def _parse_answer(text: str) -> str:
    """The answer in a generated continuation: its first line, stripped of spaces and final punctuation."""
    line = text.strip().split("\n")[0].strip()
    return line.rstrip(".!,;:").strip().lower()


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations (special tokens dropped) of each example's prompt, batched with left padding."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for i in progress_bar(range(0, len(examples), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = examples[i : i + batch_size]
            prompts = [tokenizer(ex.prompt + ex.sep.rstrip(), add_special_tokens=False)["input_ids"] for ex in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(chunk), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(prompts):  # left padding, so every row continues right after its prompt
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            out = cast(Any, model).generate(  # a transformers model (nn.Module does not declare generate)
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id(tokenizer),
            )
            texts += [tokenizer.decode(out[r, width:], skip_special_tokens=True) for r in range(len(chunk))]
    finally:
        model.train(was_training)
    return texts


def exact_match(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generate",
) -> float:
    """Generative accuracy: greedy decoding after each prompt, the answer parsed from the output (first line,
    case-insensitive, trailing punctuation dropped) compared with the right choice. This is where collapse shows:
    a model that emits only EOS or breaks the answer format scores 0 here even if its likelihoods still rank well."""
    texts = generate_texts(
        model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc=desc
    )
    right = sum(int(_parse_answer(t) == ex.answer.strip().lower()) for t, ex in zip(texts, examples))
    return right / max(1, len(examples))
