"""Evaluating a causal language model on ``gallop.data.Example`` lists: multiple-choice accuracy by the
log-likelihood of each choice (summed, or length-normalized as lm-eval's ``acc_norm``), and generative exact match
(greedy decoding, the answer parsed from the output)."""

from __future__ import annotations

import inspect
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
    """Sum of the log-probabilities of each choice's tokens given the prompt, per example and choice.

    Each row is ``encode(tokenizer, prompt, choice, sep)``. The prompt is encoded once per example: its tokens that
    every choice's row shares (up to the first scored token) run through the model once with ``use_cache=True``,
    the cache is copied to each choice, and only the choice's remaining tokens run after it. ``batch_size`` bounds
    the choice rows per forward; examples are batched by length. A model whose ``forward`` takes no cache
    (``past_key_values`` in transformers 4, ``cache`` in 5), or an example whose choices share fewer than two
    tokens, is scored by running every full row."""
    rows = [[encode(tokenizer, ex.prompt, choice, ex.sep) for choice in ex.choices] for ex in examples]
    out = [[0.0] * len(ex.choices) for ex in examples]
    device = next(model.parameters()).device
    cached = _cache_argument(model)
    shared = [_shared_prefix(r) for r in rows]
    straight = [e for e in range(len(rows)) if not cached or shared[e] < 2 or not rows[e]]
    prefixed = sorted((e for e in range(len(rows)) if cached and shared[e] >= 2 and rows[e]), key=shared.__getitem__)
    batches: list[list[int]] = []
    batch: list[int] = []
    n_rows = 0
    for e in prefixed:  # whole examples, at most batch_size choice rows (one example may exceed it alone)
        if batch and n_rows + len(rows[e]) > batch_size:
            batches.append(batch)
            batch, n_rows = [], 0
        batch.append(e)
        n_rows += len(rows[e])
    if batch:
        batches.append(batch)
    was_training = model.training
    model.eval()
    try:
        pairs = [(e, c, row, n) for e in straight for c, (row, n) in enumerate(rows[e])]
        pairs.sort(key=lambda p: len(p[2]))
        steps: list[tuple[str, list[Any]]] = [
            ("straight", pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)
        ]
        steps += [("prefixed", b) for b in batches]
        for kind, chunk in progress_bar(steps, desc=desc, disable=not progress, leave=False):
            if kind == "straight":
                _score_straight(model, tokenizer, chunk, out, device)
            else:
                assert cached is not None
                _score_prefixed(model, tokenizer, [(e, rows[e], shared[e] - 1) for e in chunk], out, device, cached)
    finally:
        model.train(was_training)
    return out


def _cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes and returns its key/value cache, or None without one."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("past_key_values", "cache") if name in params), None)


def _one_logit(model: nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where ``model.forward`` takes it (transformers >= 4.50), else nothing."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _shared_prefix(rows: list[tuple[list[int], int]]) -> int:
    """How many leading tokens all of one example's choice rows share, at most up to the first scored token."""
    if not rows:
        return 0
    n = min(min(n_prompt, len(row)) for row, n_prompt in rows)
    first = rows[0][0]
    for row, _ in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n


def _padded(seqs: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


def _score_straight(model: nn.Module, tokenizer, chunk, out: list[list[float]], device: torch.device) -> None:
    """Score ``(example, choice, row, n_prompt)`` rows by running each full row."""
    ids, mask = _padded([p[2] for p in chunk], pad_id(tokenizer))
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
    for r, (e, c, row, n_prompt) in enumerate(chunk):
        out[e][c] = float(tok_lp[r, n_prompt - 1 : len(row) - 1].sum())


def _score_prefixed(
    model: nn.Module, tokenizer, chunk, out: list[list[float]], device: torch.device, cache_name: str
) -> None:
    """Score ``(example, rows, n_cached)``: the first ``n_cached`` tokens (shared by all the example's rows, fewer
    than its first scored token) run once, then each row's remaining tokens run after a copy of that cache."""
    pad = pad_id(tokenizer)
    prefix_ids, prefix_mask = _padded([rows[0][0][:n] for _, rows, n in chunk], pad)
    positions = torch.arange(prefix_ids.shape[1]).expand_as(prefix_ids)
    prefix_out = model(
        input_ids=prefix_ids.to(device),
        attention_mask=prefix_mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **_one_logit(model),  # the prefix's logits go unused: skip the vocabulary projection where the model can
    )
    cache = getattr(prefix_out, cache_name)
    owner = [i for i, (_, rows, _) in enumerate(chunk) for _ in rows]
    cache.batch_select_indices(torch.tensor(owner, device=device))
    tails = [row[n:] for _, rows, n in chunk for row, _ in rows]
    tail_ids, tail_mask = _padded(tails, pad)
    starts = torch.tensor([chunk[i][2] for i in owner])
    tail_positions = starts[:, None] + torch.arange(tail_ids.shape[1])[None, :]
    mask = torch.cat([prefix_mask[owner], tail_mask], dim=1)
    logits = model(
        input_ids=tail_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=tail_positions.to(device),
        use_cache=True,
        **{cache_name: cache},
    ).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok_lp = logp.gather(-1, tail_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
    r = 0
    for e, rows, n in chunk:
        for c, (row, n_prompt) in enumerate(rows):
            # token t of the row is scored by the logits at t - 1, which is tail position t - 1 - n
            out[e][c] = float(tok_lp[r, n_prompt - 1 - n : len(row) - 1 - n].sum())
            r += 1


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
