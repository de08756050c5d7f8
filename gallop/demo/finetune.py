"""The end-to-end GaLLoP job behind ``gallop finetune`` (and ``make demo``), on ``GallopTrainer``.

Load a model, evaluate it (in distribution: the training task's or dataset's held-out examples; out of
distribution: other built-in tasks), compute the calibration gradient on a random fraction ``d_s`` of the training
set, select, train only the selected entries with the Hugging Face Trainer (checkpoints, resume, accumulation, bf16,
``report_to`` all come from ``TrainingArguments``), evaluate again, and write the adapter, ``metrics.json`` and
(with matplotlib) ``loss.png``. Every argument is checked before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gallop.calibrate import CalibrationArguments
from gallop.config import GallopConfig
from gallop.data import DataArguments as BaseDataArguments
from gallop.models import ModelArguments

__all__ = ["ModelArguments", "DataArguments", "FinetuneArguments", "finetune", "training_defaults", "check"]
logger = logging.getLogger(__name__)


@dataclass
class DataArguments(BaseDataArguments):
    """The training data (the library's data options) and the evaluation sets."""

    split: str = field(default="train", metadata={"help": "the dataset split to train on"})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "the dataset split to evaluate on (default: the last fifth of --split is held out)"},
    )
    max_length: int = field(default=512, metadata={"help": "truncate examples to this many tokens"})
    train_examples: int = field(default=256, metadata={"help": "training examples used (at most)"})
    eval_examples: int = field(default=24, metadata={"help": "test examples per task (ID and each OOD task)"})
    ood_tasks: str = field(
        default="capitals,antonyms,plurals,sounds",
        metadata={
            "help": "comma list of built-in tasks to evaluate OOD (default: the knowledge the model has, where "
            "forgetting shows), 'all', or 'none'"
        },
    )


@dataclass
class FinetuneArguments(CalibrationArguments):
    """The calibration gradient and the outputs of ``gallop finetune`` (the selection itself is a GallopConfig)."""

    calib_fraction: float = field(
        default=0.25,
        metadata={
            "help": "d_s: the random fraction of the training examples whose mean per-example gradient scores "
            "the weights"
        },
    )
    save_deltas: bool = field(default=False, metadata={"help": "also store fp32 deltas in the adapter (to resume)"})
    plot: bool = field(default=True, metadata={"help": "write loss.png (needs matplotlib: pip install gallop[demo])"})


def training_defaults() -> dict[str, Any]:
    """The TrainingArguments defaults of ``gallop finetune`` (the demo: 32 steps of 8 examples at lr 6e-5)."""
    import torch
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    defaults = dict(
        output_dir=None,
        max_steps=32,
        per_device_train_batch_size=8,
        learning_rate=6e-5,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    if "warmup_ratio" in names:  # transformers < 5
        defaults["warmup_ratio"] = 0.1
    else:
        defaults["warmup_steps"] = 0.1  # a float below 1 is a ratio of the total steps
    return {k: v for k, v in defaults.items() if k in names}


def check(
    model_args: ModelArguments, data: DataArguments, config: GallopConfig, args: FinetuneArguments, training
) -> None:
    """Every check that needs no model: raises ValueError / FileNotFoundError naming the argument and the fix."""
    from gallop.adapters import check_writable_folder
    from gallop.data import check_dataset_spec
    from gallop.models import BUILTIN_MODELS, check_device, check_dtype
    from gallop.quantized import check_quantization
    from gallop.tasks import TASKS, available_examples

    check_dtype(model_args.dtype)
    check_device(model_args.resolved_device())
    check_quantization(model_args.quantization)
    if model_args.model not in BUILTIN_MODELS and (
        model_args.model.startswith((".", "/", "~")) or model_args.model.endswith(".gguf")
    ):
        if not Path(model_args.model).expanduser().exists():
            raise FileNotFoundError(
                f"--model {model_args.model!r} not found: pass 'smollm2', 'gemma3-270m', a local "
                f"model folder, a .gguf file or a Hub id"
            )
    if not isinstance(config, GallopConfig):  # a GallopConfig validated density, scorer, budget, eps, regexes
        raise TypeError(f"config must be a gallop.GallopConfig, got {type(config).__name__}")
    if not 0 < args.calib_fraction <= 1:
        raise ValueError(f"--calib_fraction (d_s) must be in (0, 1], got {args.calib_fraction}")
    if args.calib_slices < 1:
        raise ValueError(f"--calib_slices must be a positive int, got {args.calib_slices}")
    for name in ("max_length", "train_examples", "eval_examples"):
        v = getattr(data, name)
        if v < 1:
            raise ValueError(f"--{name} must be a positive int, got {v}")
    if data.max_length < 2:
        raise ValueError(
            f"--max_length {data.max_length} leaves no room for an answer token after the prompt; pass at least 2 "
            f"(the default is 512)"
        )
    if data.dataset is None:
        if data.task not in TASKS:
            raise ValueError(
                f"--task must be a built-in task ({', '.join(TASKS)}), or pass --dataset; got {data.task!r}"
            )
        for split, n in (("train", data.train_examples), ("test", data.eval_examples)):
            have = available_examples(data.task, split, n)
            if n > have:
                raise ValueError(
                    f"--{'train' if split == 'train' else 'eval'}_examples {n} is more than task "
                    f"{data.task!r} has ({have} {split} examples)"
                )
    else:
        check_dataset_spec(data.dataset, "--dataset")
    for t in ood_task_names(data):
        if t not in TASKS:
            raise ValueError(f"--ood_tasks names an unknown task {t!r}; built-in tasks: {', '.join(TASKS)}")
    if training.max_steps is None or training.max_steps < 1:
        raise ValueError(f"--max_steps must be a positive int, got {training.max_steps}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        v = getattr(training, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} must be a positive int, got {v}")
    if training.max_grad_norm is not None and training.max_grad_norm < 0:
        raise ValueError(f"--max_grad_norm must be >= 0 (0 disables clipping), got {training.max_grad_norm}")
    if training.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0, got {training.weight_decay}")
    if training.learning_rate <= 0 or not math.isfinite(training.learning_rate):
        raise ValueError(f"--learning_rate must be a positive number, got {training.learning_rate}")
    check_writable_folder(training.output_dir, "--output_dir")


def ood_task_names(data: DataArguments) -> list[str]:
    from gallop.tasks import TASKS

    if data.ood_tasks == "none":
        return []
    names = list(TASKS) if data.ood_tasks == "all" else [t.strip() for t in data.ood_tasks.split(",") if t.strip()]
    return [t for t in names if t != (data.task if data.dataset is None else None)]


def load_data(data: DataArguments, tokenizer):
    """(train examples, ID test examples, {OOD task: test examples})."""
    from gallop.data import load_examples
    from gallop.tasks import task_examples

    if data.dataset is None:
        train = task_examples(data.task, "train", data.train_examples)
        test = task_examples(data.task, "test", data.eval_examples)
    else:
        rows = load_examples(data.dataset, tokenizer, split=data.split, columns=data.columns())
        if data.eval_split:
            test = load_examples(data.dataset, tokenizer, split=data.eval_split, columns=data.columns())
        else:
            if len(rows) < 2:
                raise ValueError(
                    f"{data.dataset}: needs at least 2 records (a held-out fifth is the test set), or pass --eval_split"
                )
            n_test = max(1, len(rows) // 5)
            rows, test = rows[:-n_test], rows[-n_test:]
        train = rows[: data.train_examples]
        test = test[: data.eval_examples]
    ood = {t: task_examples(t, "test", data.eval_examples) for t in ood_task_names(data)}
    return train, test, ood


def evaluate_all(model, tokenizer, test, ood, progress: bool, label: str) -> dict:
    """Accuracy on the ID examples that have choices (else its loss-free exact-match stays absent), and OOD."""
    from gallop.evaluation import accuracy

    scored = [e for e in test if len(e.choices) > 1]
    res = {
        "id": accuracy(model, tokenizer, scored, progress=progress, desc=f"{label} ID") if scored else None,
        "ood": {t: accuracy(model, tokenizer, ex, progress=progress, desc=f"{label} OOD {t}") for t, ex in ood.items()},
    }
    res["ood_mean"] = sum(res["ood"].values()) / len(res["ood"]) if res["ood"] else None
    return res


def plot_loss(losses: list[float], learning_rates: list[float], path: Path, title: str) -> bool:
    """loss.png: the training loss at every optimizer step, and the learning rate beside it; False (and a log
    line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install gallop[demo]): no loss.png")
        return False
    if not losses:
        return False
    steps = list(range(1, len(losses) + 1))
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax.plot(steps, losses, lw=1.5, marker="o", ms=2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax_lr.plot(steps[: len(learning_rates)], learning_rates, lw=1.5, color="tab:orange")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _recording_trainer():
    from transformers import TrainerCallback

    from gallop.trainer import GallopTrainer

    class StepRecorder(TrainerCallback):
        """After each optimizer step: the step's loss (the sum over its micro-batches, as the Trainer logs it) and
        the learning rate it used."""

        def __init__(self, trainer) -> None:
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            t = self.trainer
            t.step_losses.append(sum(t._micro_losses))
            t._micro_losses.clear()
            scheduler = kwargs.get("lr_scheduler")
            if scheduler is not None:
                t.learning_rates.append(float(scheduler.get_last_lr()[0]))

    class RecordingTrainer(GallopTrainer):
        """GallopTrainer recording every step's loss and learning rate (for loss.png)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.step_losses: list[float] = []
            self.learning_rates: list[float] = []
            self._micro_losses: list[float] = []
            self.add_callback(StepRecorder(self))

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self._micro_losses.append(float(loss))
            return loss

    return RecordingTrainer


def finetune(
    model_args: ModelArguments,
    data: DataArguments,
    config: GallopConfig,
    args: FinetuneArguments,
    training,
    model=None,
    tokenizer=None,
) -> dict:
    """Run the whole job; returns the metrics (also written to ``<output_dir>/metrics.json``). The selection's
    seed is the training seed (``gallop finetune --seed`` sets both)."""
    import torch

    from gallop import SparseModel, mean_gradients, select
    from gallop.adapters import atomic_write_text
    from gallop.calibrate import calibration_subset
    from gallop.data import Collator, batches
    from gallop.models import load_model

    from .evaluate import collapse_rate, forget_ratio

    check(model_args, data, config, args, training)
    progress = not training.disable_tqdm
    timings: dict[str, float] = {}
    torch.manual_seed(training.seed)
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(
            model_args.model,
            dtype=model_args.dtype,
            device=model_args.resolved_device(),
            revision=model_args.revision,
            quantization=model_args.quantization,
        )
    timings["load_s"] = time.perf_counter() - t0
    train, test, ood = load_data(data, tokenizer)

    t0 = time.perf_counter()
    vanilla = evaluate_all(model, tokenizer, test, ood, progress, "vanilla")
    timings["eval_vanilla_s"] = time.perf_counter() - t0

    config = dataclasses.replace(config, seed=training.seed)
    t0 = time.perf_counter()
    grads = None
    if config.uses_gradients:
        calib = [train[i] for i in calibration_subset(len(train), args.calib_fraction, training.seed)]
        grads = mean_gradients(
            model,
            # a list: --calib_slices reads it once per slice
            list(batches(tokenizer, calib, training.per_device_train_batch_size, max_length=data.max_length)),
            config,
            progress=progress,
            reduction=args.calib_reduction,
            accumulate=args.accumulate,
            slices=args.calib_slices,
        )
    timings["calibration_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    selection = select(model, grads, config)
    del grads
    timings["selection_s"] = time.perf_counter() - t0
    logger.info("%s; %.4f%% of all parameters", selection, 100 * selection.density_of_all(model))

    out = Path(training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sparse = SparseModel(model, selection)
    trainer = _recording_trainer()(
        sparse_model=sparse, args=training, train_dataset=train, data_collator=Collator(tokenizer, data.max_length)
    )
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    timings["train_s"] = time.perf_counter() - t0
    tokens = sum(len(tokenizer(e.prompt + e.sep + e.answer)["input_ids"]) for e in train)
    epochs = (
        training.max_steps * training.per_device_train_batch_size * training.gradient_accumulation_steps / len(train)
    )

    t0 = time.perf_counter()
    tuned = evaluate_all(model, tokenizer, test, ood, progress, "fine-tuned")
    timings["eval_tuned_s"] = time.perf_counter() - t0
    metrics = {
        "model": model_args.model,
        "train": task_label(data),
        "num_selected": sparse.num_selected,
        "num_eligible": selection.num_eligible,
        "density_eligible": selection.density,
        "density_all": selection.density_of_all(model),
        "vanilla": vanilla,
        "finetuned": tuned,
        "id_gain": None if tuned["id"] is None else tuned["id"] - vanilla["id"],
        "forget_ratio": None if not ood else forget_ratio(vanilla["ood_mean"], tuned["ood_mean"]),
        "collapse_rate": None if not ood else collapse_rate(tuned["ood"]),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "step_losses": trainer.step_losses,
        "learning_rates": trainer.learning_rates,
        "timings_s": timings,
        "train_tokens_per_s": tokens * epochs / max(1e-9, timings["train_s"]),
        "args": {
            "model": dataclasses.asdict(model_args),
            "data": dataclasses.asdict(data),
            "selection": {**dataclasses.asdict(config), **dataclasses.asdict(args)},
        },
    }
    sparse.save_pretrained(
        out / "adapter",
        save_deltas=args.save_deltas,
        metrics={
            k: v
            for k, v in (
                ("id_acc", tuned["id"]),
                ("ood_acc", tuned["ood_mean"]),
                ("forget_ratio", metrics["forget_ratio"]),
            )
            if v is not None and math.isfinite(v)  # the adapter config is strict JSON
        },
    )
    if args.plot:
        metrics["loss_png"] = plot_loss(
            trainer.step_losses,
            trainer.learning_rates,
            out / "loss.png",
            f"GaLLoP {config.scorer} {100 * config.density:g}% on {metrics['train']}",
        )
    atomic_write_text(out / "metrics.json", json.dumps(_strict(metrics), indent=1, default=str, allow_nan=False))
    return metrics


def _strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, so metrics.json is strict JSON (a NaN loss reads null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def task_label(data: DataArguments) -> str:
    """The training task's name in tables, metrics.json and plots: the built-in task, or the dataset's folder or
    file stem (``~/data/sciq/`` and ``sciq.jsonl`` are ``sciq``; a Hub id ``allenai/sciq`` is ``sciq``)."""
    from gallop.data import dataset_label

    return data.task if data.dataset is None else dataset_label(data.dataset)


def default_output_dir(data: DataArguments) -> str:
    return os.path.join("runs", f"finetune-{task_label(data)}")
