"""load_model: local folders in any dtype, device checks, built-in names, clear errors."""

import pytest
import torch

from gallop.models import check_device, check_dtype, load_model, resolve_model

from ..models import llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("model")
    llama().save_pretrained(d)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="b").save_pretrained(d)
    return d


@pytest.mark.parametrize("dtype, want", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_local_folder_in_any_dtype(model_dir, dtype, want):
    model, tok = load_model(str(model_dir), dtype=dtype)
    assert all(p.dtype == want for p in model.parameters())
    assert tok("a b")["input_ids"] == [1, 2]


def test_checks_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        check_dtype("fp8")
    assert check_dtype("auto") == "auto" and check_dtype(torch.bfloat16) is torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            check_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu0")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "x.gguf"))
    assert resolve_model("someone/some-model") == ("someone/some-model", {})  # a Hub id passes through


@pytest.mark.model
def test_builtin_smollm2_resolves_to_its_gguf():
    source, extra = resolve_model("smollm2")
    assert extra["gguf_file"].endswith(".gguf")


@pytest.mark.model
def test_builtin_smollm2_loads_dense_and_unmarked_so_trainers_train_it_and_it_saves(tmp_path):
    """transformers 5.2x dequantizes a GGUF but keeps it marked quantized: its Trainer then refused to train it
    ("purely quantized models") and save_pretrained refused to save it. load_model drops the marks."""
    from transformers import Trainer, TrainingArguments

    model, _ = load_model("smollm2")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], max_steps=1))
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").is_file()
