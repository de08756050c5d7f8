"""gallop experiment: the metrics, the resume, the report, and bad input; the quick preset runs on SmolLM2."""

import json

import pytest

from gallop import eligible_parameters
from gallop.demo.evaluate import collapse_rate, collapsed_tasks, forget_ratio
from gallop.demo.experiment import (
    ExperimentArguments,
    _done,
    check,
    check_protocol,
    metrics,
    run_experiment,
    write_report,
)


def test_paper_metrics():
    assert forget_ratio(0.8, 0.6) == pytest.approx(0.25) and forget_ratio(0.8, 0.9) == 0.0
    assert forget_ratio(0.0, 0.5) == 0.0
    accs = {"a": 0.0, "b": 0.009, "c": 0.01, "d": 0.5}
    assert collapsed_tasks(accs) == ["a", "b"]  # floored accuracy in percent is 0
    assert collapse_rate(accs) == 0.5


def test_metrics_of_a_run():
    record = {"acc": {"t": 0.9, "u": 0.4, "v": 0.0}, "exact_match": None}
    vanilla = {"acc": {"t": 0.5, "u": 0.8, "v": 0.6}}
    m = metrics(record, vanilla, "t", ["t", "u", "v"])
    assert m["id_acc"] == 0.9 and m["ood_acc"] == pytest.approx(0.2) and m["vanilla_ood_acc"] == pytest.approx(0.7)
    assert m["forget_ratio"] == pytest.approx(0.5 / 0.7) and m["collapse_rate"] == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": "gallop,adapterfusion"}, "unknown method"),
        ({"tasks": "no_such_task"}, "neither a built-in task"),
        ({"ranks": "0"}, "--ranks must be positive"),
        ({"train_examples": 10**6}, "is more than task"),
        ({"calib_fraction": 0.0}, "calib_fraction"),
    ],
)
def test_bad_input_fails_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check(ExperimentArguments(**kwargs))


def test_a_budget_larger_than_the_model_is_refused():
    from gallop.demo.experiment import check_budgets, lora_trainable

    from ...models import tiny

    model = tiny("llama")
    eligible = sum(p.numel() for p in eligible_parameters(model).values())
    top = eligible // lora_trainable(model, 1)
    check_budgets(model, ExperimentArguments(ranks=f"1,{top}"))
    with pytest.raises(ValueError, match=f"rank {top + 1} sets a budget of .* use ranks of at most {top}"):
        check_budgets(model, ExperimentArguments(ranks=f"2,{top + 1}"))


def test_a_task_file_without_choices_is_refused(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    with pytest.raises(ValueError, match="no multiple-choice records"):
        check(ExperimentArguments(tasks=str(f)))


def test_resume_skips_finished_runs_and_ignores_a_cut_line(tmp_path):
    rows = [{"run_id": "gallop|r2|parity|s0"}, {"run_id": "lora|r2|parity|s0"}]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"run_id": "full|r0|pa')
    assert _done(tmp_path / "results.jsonl") == {"gallop|r2|parity|s0", "lora|r2|parity|s0"}


@pytest.mark.parametrize("name, value", [("steps", 3), ("lr_sparse", 1e-3), ("eval_examples", 8), ("model", "x")])
def test_resume_into_a_folder_of_other_settings_is_refused_before_anything_runs(tmp_path, name, value):
    import dataclasses

    before = ExperimentArguments(out=str(tmp_path))
    (tmp_path / "args.json").write_text(json.dumps(dataclasses.asdict(before)))
    (tmp_path / "results.jsonl").write_text('{"run_id": "gallop|r2|parity|s0"}\n')
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=f"--{name}: .* holds runs made with {name}="):
        run_experiment(dataclasses.replace(before, **{name: value}))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # nothing touched
    # growing the grid (other tasks, methods, ranks, seeds) under the same settings is allowed
    check_protocol(dataclasses.replace(before, tasks="sentiment", methods="lora", ranks="4", seeds="5"), tmp_path)


def test_resume_with_another_ood_set_for_a_trained_task_is_refused(tmp_path):
    row = {"run_id": "gallop|r8|parity|s0", "train_task": "parity", "ood": {"sentiment": 1.0, "capitals": 1.0}}
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    same = ExperimentArguments(tasks="parity,sentiment", probe_tasks="capitals", out=str(tmp_path))
    check_protocol(same, tmp_path)
    check_protocol(ExperimentArguments(tasks="compare", probe_tasks="capitals", out=str(tmp_path)), tmp_path)
    with pytest.raises(ValueError, match=r"trained on 'parity' .* evaluated out of distribution on"):
        check_protocol(ExperimentArguments(tasks="parity", probe_tasks="capitals", out=str(tmp_path)), tmp_path)


def test_report_from_results(tmp_path):
    base = {
        "model": "m",
        "budget": 10,
        "trainable": 10,
        "density": 0.1,
        "seed": 0,
        "losses": [1.0],
        "wall_s": 1.0,
        "peak_mem_mb": 1.0,
        "vanilla_id_acc": 0.5,
        "vanilla_ood_acc": 0.8,
        "collapse_rate": 0.0,
    }
    rows = []
    for method, rank, id_acc, ood in (("gallop", 2, 0.9, 0.78), ("lora", 2, 0.95, 0.6), ("full", 0, 1.0, 0.4)):
        for task in ("parity", "compare"):
            rows.append(
                {
                    **base,
                    "run_id": f"{method}|r{rank}|{task}|s0",
                    "method": method,
                    "rank": rank,
                    "train_task": task,
                    "id_acc": id_acc,
                    "ood_acc": ood,
                    "ood": {"capitals": ood, ("compare" if task == "parity" else "parity"): 0.5},
                    "forget_ratio": forget_ratio(0.8, ood),
                }
            )
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "vanilla.json").write_text(json.dumps({"acc": {"capitals": 0.8, "compare": 0.5, "parity": 0.25}}))
    text = write_report(tmp_path).read_text()
    assert "| gallop | 2 |" in text and "| full | - |" in text and "forget ratio" in text
    assert "| gallop | 2 | 10 | 2 | 2 | 90.0 ± 0.0 | 78.0 ± 0.0 | -2.0 ± 0.0 |" in text  # OOD Δ = 0.78 - 0.8
    assert "| full | - | -2.0 | -2.0 |" not in text and "| full | - | -40.0 | -40.0 |" in text  # per-task table
    # per OOD task: capitals moved by ood - 0.8; compare (OOD when training on parity) by 0; parity by +25 points
    assert "| method | rank | capitals | compare | parity |" in text
    assert "| lora | 2 | -20.0 ± 0.0 | 0.0 | 25.0 |" in text and "| (vanilla acc) | - | 80.0 | 50.0 | 25.0 |" in text
    assert (tmp_path / "id_vs_ood.png").is_file() and (tmp_path / "forget_ratio.png").is_file()


@pytest.mark.model
@pytest.mark.slow
def test_quick_preset_on_smollm2_resumes(tmp_path):
    args = ExperimentArguments(quick=True, out=str(tmp_path))
    run_experiment(args)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4  # two tasks x two methods
    row = json.loads(lines[0])
    for key in (
        "method",
        "model",
        "train_task",
        "seed",
        "trainable",
        "density",
        "id_acc",
        "ood_acc",
        "ood",
        "vanilla_id_acc",
        "vanilla_ood_acc",
        "forget_ratio",
        "collapse_rate",
        "wall_s",
        "peak_mem_mb",
    ):
        assert key in row, key
    run_experiment(ExperimentArguments(quick=True, out=str(tmp_path)))  # everything done: nothing is rerun
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines
    assert (tmp_path / "report.md").is_file()
