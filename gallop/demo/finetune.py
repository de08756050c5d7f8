"""The end-to-end GaLLoP job behind ``gallop finetune`` (and ``make demo``).

Load a model, evaluate it (in-distribution: the training task's test split; out-of-distribution: the other
built-in tasks), compute calibration gradients, select, train only the selected entries, evaluate again, and
write the adapter, a metrics JSON and a loss-curve PNG.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import atomic_write_text
from ..calibrate import mean_gradients
from ..config import GallopConfig
from ..optim import SparseAdamW
from ..selection import select
from ..sparse import SparseModel
from .evaluate import accuracy, collapsed_tasks, forget_ratio
from .tasks import TASKS, Example, batches, load_jsonl, task_examples


@dataclass
class FinetuneArgs:
    """Options of ``finetune`` (and of ``gallop finetune``, which maps each to a ``--flag``)."""

    model: str = "smollm2"
    task: str = "sentiment"
    density: float = 0.01
    scorer: str = "gallop"
    budget: str = "global"
    steps: int = 60
    batch_size: int = 8
    lr: float = 3e-5
    weight_decay: float = 0.0
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    calib_examples: int = 64
    train_examples: int = 256
    eval_examples: int = 48
    ood_tasks: list = field(default_factory=lambda: [t for t in TASKS])
    device: str = "cpu"
    output_dir: str = "runs/finetune"
    save_deltas: bool = False
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        GallopConfig(density=self.density, scorer=self.scorer, budget=self.budget, seed=self.seed)
        for name in ("steps", "batch_size", "calib_examples", "train_examples", "eval_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        unknown = [t for t in self.ood_tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown OOD tasks {unknown}; built-in tasks: {', '.join(TASKS)}")
        if self.task not in TASKS and not Path(self.task).is_file():
            raise ValueError(
                f"task must be a built-in task ({', '.join(TASKS)}) or an existing JSONL file, got {self.task!r}"
            )


def _data(args: FinetuneArgs) -> tuple[list[Example], list[Example], dict[str, list[Example]]]:
    """(train examples, in-distribution test examples, OOD task -> test examples)."""
    if args.task in TASKS:
        train = task_examples(args.task, "train", args.train_examples)
        test = task_examples(args.task, "test", args.eval_examples)
    else:
        rows = load_jsonl(args.task)
        if len(rows) < 2:
            raise ValueError(f"{args.task}: needs at least 2 examples (train and held-out test)")
        n_test = max(1, len(rows) // 5)
        test = [r for r in rows[-n_test:] if len(r.choices) > 1]  # accuracy needs choices
        train = rows[:-n_test][: args.train_examples]
    ood = {t: task_examples(t, "test", args.eval_examples) for t in args.ood_tasks if t != args.task}
    return train, test, ood


def _evaluate(model, tok, test, ood, progress: bool, label: str) -> dict:
    res = {
        "id": accuracy(model, tok, test, progress=progress, desc=f"{label} ID") if test else float("nan"),
        "ood": {t: accuracy(model, tok, ex, progress=progress, desc=f"{label} OOD {t}") for t, ex in ood.items()},
    }
    res["ood_mean"] = sum(res["ood"].values()) / len(res["ood"]) if res["ood"] else float("nan")
    return res


def _lr_lambda(steps: int, warmup: float):
    n_warm = int(warmup * steps)

    def f(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (steps - step) / max(1, steps - n_warm))

    return f


def _plot_loss(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, alpha=0.4, label="loss")
    w = max(1, len(losses) // 10)
    smooth = [
        sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1]) for i in range(len(losses))
    ]
    ax.plot(range(1, len(losses) + 1), smooth, lw=2, label=f"mean of last {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finetune(args: FinetuneArgs, model=None, tokenizer=None) -> dict:
    """Run the whole GaLLoP job; returns the metrics (also written to ``output_dir/metrics.json``)."""
    from ..models import load_model

    args.validate()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    timings = {}
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(args.model, device=device)
    timings["load_s"] = time.perf_counter() - t0
    train, test, ood = _data(args)

    t0 = time.perf_counter()
    vanilla = _evaluate(model, tokenizer, test, ood, args.progress, "vanilla")
    timings["eval_vanilla_s"] = time.perf_counter() - t0

    config = GallopConfig(density=args.density, scorer=args.scorer, budget=args.budget, seed=args.seed)
    t0 = time.perf_counter()
    grads = None
    if config.uses_gradients:
        grads = mean_gradients(
            model, batches(tokenizer, train[: args.calib_examples], args.batch_size), config, progress=args.progress
        )
    timings["calibration_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    selection = select(model, grads, config)
    del grads
    timings["selection_s"] = time.perf_counter() - t0

    sparse = SparseModel(model, selection)
    opt = SparseAdamW(sparse, lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(args.steps, args.warmup))
    epochs = math.ceil(args.steps * args.batch_size / len(train)) + 1
    stream = batches(tokenizer, train, args.batch_size, epochs=epochs, seed=args.seed)
    losses = []
    tokens = 0
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="sparse fine-tuning", disable=not args.progress, unit="step")
    for step in bar:
        batch = {k: v.to(device) for k, v in next(stream).items()}
        tokens += int(batch["attention_mask"].sum())
        loss = sparse(**batch).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(
                f"the training loss is {value} at step {step + 1}: lower --lr (now {args.lr}) or check the data"
            )
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
    model.eval()
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuned = _evaluate(model, tokenizer, test, ood, args.progress, "fine-tuned")
    timings["eval_tuned_s"] = time.perf_counter() - t0
    sparse.save_pretrained(out / "adapter", save_deltas=args.save_deltas)
    _plot_loss(losses, out / "loss.png", f"GaLLoP {args.scorer} {100 * args.density:g}% on {args.task}")

    metrics = {
        "args": asdict(args),
        "num_selected": sparse.num_selected,
        "num_eligible": selection.num_eligible,
        "vanilla": vanilla,
        "finetuned": tuned,
        "id_gain": tuned["id"] - vanilla["id"],
        "forget_ratio": forget_ratio(vanilla["ood_mean"], tuned["ood_mean"]),
        "collapsed_ood_tasks": collapsed_tasks(tuned["ood"]),
        "losses": losses,
        "timings_s": timings,
        "train_tokens_per_s": tokens / max(1e-9, timings["train_s"]),
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics
