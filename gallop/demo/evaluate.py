"""The paper's forgetting metrics (the forget ratio, the collapse rate) over accuracies that ``gallop.evaluation``
measures, and the paired bootstrap interval of one method's difference from another over test items.

The paper (arXiv 2510.19778) reports both metrics per round against the vanilla model; its text was not reachable
from this workspace, so the definitions implemented are the ones the project's design notes record from it:

* forget ratio ``max(0, (acc_ood_vanilla - acc_ood) / acc_ood_vanilla)`` on the mean accuracy over the round's OOD
  sets (the other seven);
* collapse rate: the fraction of the round's OOD sets whose accuracy, floored in percent, is 0. The experiment
  scores it on greedy generation (the model stops giving a parseable answer), where the paper sees collapse; a
  likelihood score never reaches 0 on multiple choice.
"""

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


def paired_bootstrap(
    a: dict[str, list[float]],
    b: dict[str, list[float]],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The mean difference ``a - b`` and its percentile bootstrap interval, paired over test items.

    ``a`` and ``b`` map each group (a training round) to per-item scores (1/0 correct, or a mean over seeds) on the
    same items in the same order. Each resample draws the items of every group with replacement (the same draw for
    both methods: paired), takes each group's mean difference and then the mean over groups, every group weighted
    equally. Returns ``(difference, low, high)``; seeded, so a report regenerates bit for bit."""
    import numpy as np

    if sorted(a) != sorted(b) or not a:
        raise ValueError(f"a and b must score the same non-empty groups, got {sorted(a)} and {sorted(b)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    per_group = []
    point = []
    for g in sorted(a):
        diff = np.asarray(a[g], dtype=np.float64) - np.asarray(b[g], dtype=np.float64)
        if diff.ndim != 1 or len(diff) == 0 or len(a[g]) != len(b[g]):
            raise ValueError(f"group {g!r}: a and b need the same non-zero number of items")
        point.append(diff.mean())
        per_group.append(diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1))
    means = np.mean(per_group, axis=0)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(np.mean(point)), float(low), float(high)
