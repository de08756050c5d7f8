"""The Trainer paths: a plain transformers.Trainer on the wrapper trains exactly the deltas; GallopTrainer's
checkpoints are adapters (deltas + optimizer state, no model) and resume exactly."""

import pytest
import torch
from safetensors.torch import load_file

from gallop import GallopConfig, SparseAdamW, SparseModel, select
from gallop.trainer import GallopTrainer

from ..models import llama, random_batches, tiny
from .helpers import adam_tol, setup, tol

pytestmark = pytest.mark.usefixtures("backend")

N_ROWS = 8


def _rows(n=N_ROWS, seed=11):
    return [{k: v[0] for k, v in b.items()} for b in random_batches(n, batch=1, seed=seed)]


def _full_batch(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=N_ROWS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _hand_loop(sparse, opt, steps, rows):
    """What the Trainer should do with one full batch per step: norms of each step's gradient."""
    batch = _full_batch(rows)
    norms = []
    for _ in range(steps):
        sparse(**batch).loss.backward()
        norms.append(float(sparse.grad_norm()))
        opt.step()
        sparse.zero_grad()
    return norms


def test_plain_trainer_with_sparse_adamw_trains_like_a_hand_loop(tmp_path):
    """The 0.1 failure: the Trainer's model.zero_grad() never reached the delta (its norm grew 1.30 -> 2.56 ->
    3.72) and the logged grad_norm was 0."""
    from transformers import Trainer, default_data_collator

    model, sel = setup()
    sparse = SparseModel(model, sel)
    trainer = Trainer(
        model=sparse,
        args=_args(tmp_path, max_grad_norm=1e9),  # clipping on (so every release logs grad_norm), never clips
        train_dataset=_rows(),
        data_collator=default_data_collator,
        optimizers=(SparseAdamW(sparse, lr=1e-2), None),
    )
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert all(p.grad is None for p in sparse.parameters())

    ref_model = tiny("llama")
    ref = SparseModel(ref_model, sel)
    norms = _hand_loop(ref, SparseAdamW(ref, lr=1e-2), 3, _rows())
    assert len(logged) == 3
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(norms), **tol(torch.float32))
    for a, b in zip(sparse.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **adam_tol(1e-2, 3))


def test_plain_trainer_with_its_own_adamw_equals_a_hand_loop(tmp_path):
    """No gallop code in the loop at all: the Trainer builds torch AdamW from model.parameters() (the deltas)."""
    from transformers import Trainer, default_data_collator

    model, sel = setup()
    sparse = SparseModel(model, sel)
    trainer = Trainer(
        model=sparse,
        args=_args(tmp_path, optim="adamw_torch"),
        train_dataset=_rows(),
        data_collator=default_data_collator,
    )
    trainer.train()
    ref = SparseModel(tiny("llama"), sel)
    _hand_loop(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0, foreach=False), 3, _rows())
    for a, b in zip(sparse.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **adam_tol(1e-2, 3))
    ref.sync()
    for a, b in zip(model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, **adam_tol(1e-2, 3))


def test_plain_trainer_checkpoint_holds_only_the_deltas(tmp_path):
    from transformers import Trainer, default_data_collator

    model, sel = setup()
    sparse = SparseModel(model, sel)
    args = _args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    Trainer(model=sparse, args=args, train_dataset=_rows(), data_collator=default_data_collator).train()
    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors"))
    assert set(saved) == set(sparse.state_dict())
    assert sum(t.numel() for t in saved.values()) == sel.num_selected + 1

    fresh = SparseModel(tiny("llama"), sel)
    Trainer(model=fresh, args=args, train_dataset=_rows(), data_collator=default_data_collator).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")
    )
    for a, b in zip(fresh.parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, **adam_tol(1e-2, 4))


def test_gallop_trainer_checkpoints_are_adapters_and_resume_exactly(tmp_path):
    model, sel = setup()
    sparse = SparseModel(model, sel)
    args = _args(
        tmp_path / "run",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
    )
    trainer = GallopTrainer(sparse_model=sparse, args=args, train_dataset=_rows())
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"} <= files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (ckpt / "adapter_model.safetensors").stat().st_size < model_bytes / 5
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged and all(g > 0 for g in logged)

    fresh_model = tiny("llama")
    fresh = SparseModel(fresh_model, sel)
    GallopTrainer(sparse_model=fresh, args=args, train_dataset=_rows()).train(resume_from_checkpoint=str(ckpt))
    for a, b in zip(fresh.parameters(), sparse.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(fresh_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    # the final save_model() is an adapter too, and it reloads onto the pristine base bit for bit
    trainer.save_model(str(tmp_path / "final"))
    reloaded = tiny("llama")
    SparseModel.from_pretrained(reloaded, tmp_path / "final")
    for a, b in zip(reloaded.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_gallop_trainer_bf16_autocast(tmp_path):
    model, sel = setup(scorer="random")
    sparse = SparseModel(model, sel)
    GallopTrainer(sparse_model=sparse, args=_args(tmp_path, bf16=True, max_steps=2), train_dataset=_rows()).train()
    assert float(sum(p.detach().abs().sum() for p in sparse.parameters())) > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_gallop_trainer_rejects_bad_setup(tmp_path):
    model, sel = setup(scorer="random")
    sparse = SparseModel(model, sel)
    with pytest.raises(ValueError, match="step_in_backward was removed"):
        GallopTrainer(sparse_model=sparse, args=_args(tmp_path), step_in_backward=True)
    with pytest.raises(TypeError, match="must be a gallop SparseModel"):
        GallopTrainer(sparse_model=model, args=_args(tmp_path))
    with pytest.raises(ValueError, match="pass the SparseModel once"):
        GallopTrainer(sparse_model=sparse, model=tiny("llama"), args=_args(tmp_path))
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(FileNotFoundError, match="not a gallop adapter folder"):
        GallopTrainer(sparse_model=sparse, args=_args(tmp_path), train_dataset=_rows()).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-1")
        )


def test_trl_sft_trainer_trains_a_gallop_model(tmp_path):
    """TRL's SFTTrainer with the SparseModel as its model: only the selected entries move."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer

    from gallop.models import smollm2_gguf

    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = llama(vocab_size=len(tok), max_position_embeddings=128)
    sel = select(model, None, GallopConfig(density=0.05, scorer="random"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = SparseModel(model, sel)
    data = datasets.Dataset.from_list(
        [{"prompt": f"Is {i} even?", "completion": " yes" if i % 2 == 0 else " no"} for i in range(16)]
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(model=sparse, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters() if n in before)
    assert 0 < changed <= sel.num_selected
