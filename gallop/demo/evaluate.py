"""The paper's forgetting metrics (the forget ratio, the collapse rate) over accuracies that ``gallop.evaluation``
measures."""

from __future__ import annotations

import math

# compatibility shim: accuracy and exact match live in gallop.evaluation; these re-exports go in gallop 0.4
from ..evaluation import accuracy as accuracy
from ..evaluation import choice_logprobs as choice_logprobs
from ..evaluation import exact_match as exact_match


def forget_ratio(acc_ood_vanilla: float, acc_ood: float) -> float:
    """The paper's forget ratio ``max(0, (acc_ood_vanilla - acc_ood) / acc_ood_vanilla)`` (0 when the vanilla
    accuracy is 0: nothing to forget)."""
    if acc_ood_vanilla <= 0:
        return 0.0
    return max(0.0, (acc_ood_vanilla - acc_ood) / acc_ood_vanilla)


def collapsed_tasks(ood_accuracies: dict[str, float]) -> list[str]:
    """The OOD sets whose floored accuracy in percent is 0 (the paper's collapse), sorted."""
    return sorted(t for t, a in ood_accuracies.items() if math.floor(100 * a) == 0)


def collapse_rate(ood_accuracies: dict[str, float]) -> float:
    """The paper's collapse rate: the fraction of OOD sets whose floored accuracy in percent is 0."""
    if not ood_accuracies:
        return 0.0
    return len(collapsed_tasks(ood_accuracies)) / len(ood_accuracies)
