"""Multiple-choice accuracy by log-likelihood, and the paper's forgetting metrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .tasks import Example, encode, pad_id


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
            ids, n_prompt = encode(tokenizer, ex.prompt, choice)
            pairs.append((e, c, ids, n_prompt))
    out = [[0.0] * len(ex.choices) for ex in examples]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
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


def forget_ratio(acc_ood_vanilla: float, acc_ood: float) -> float:
    """``max(0, (acc_ood_vanilla - acc_ood) / acc_ood_vanilla)`` (0 when the vanilla accuracy is 0)."""
    if acc_ood_vanilla <= 0:
        return 0.0
    return max(0.0, (acc_ood_vanilla - acc_ood) / acc_ood_vanilla)


def collapsed_tasks(ood_accuracies: dict[str, float]) -> list[str]:
    """The OOD tasks whose accuracy dropped to 0 (the paper's collapse), sorted."""
    return sorted(t for t, a in ood_accuracies.items() if a == 0.0)
