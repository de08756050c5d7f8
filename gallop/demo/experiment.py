"""``gallop experiment`` and ``gallop report``: the paper's protocol on a real model, every baseline at equal budget.

For each seed, training task and method, fine-tune the pretrained model on that task (in distribution) and evaluate
it on that task and on every other listed task (out of distribution), then compute the paper's metrics against the
vanilla model: forget ratio ``max(0, (acc_ood_vanilla - acc_ood) / acc_ood_vanilla)`` and collapse rate (the
fraction of OOD sets whose floored accuracy in percent is 0).

Methods: the five GaLLoP scorers (``gallop`` |g|/(|w|+eps), ``gradient`` |g| as in SAFT, ``magnitude`` as in PaFi,
``product`` |g*w| SNIP-like, ``random``), ``lora`` and ``dora`` (peft, all linear layers), ``full`` (torch AdamW on
every parameter). Budgets are LoRA ranks: each sparse method trains exactly as many entries as LoRA of that rank has
parameters (``GallopConfig(num_selected=...)``), so the comparison is at equal trainable count. Every method uses
the same data order, steps, schedule and clipping; only the learning rate differs by family.

One JSON line per run goes to ``<out>/results.jsonl``; a rerun skips the runs already there, so an interrupted grid
resumes where it stopped. ``gallop report <out>`` renders ``report.md`` and the plots.

The paper's data: ``--tasks commonsense`` (or any of ``gallop.commonsense.SETS``) trains on the eight commonsense sets
in turn and ``--probe_tasks commonsense`` evaluates every round on the other seven. Each set is split once, seeded
by ``--split_seed`` (not by the run's seed, so every seed and method meets the same test items); they are scored by
length-normalized log-likelihood (``acc_norm``) and, with ``--generative``, by greedy generation parsed for the
option (collapse, and the fraction of outputs that give no answer). Per-item results are kept for the paired
bootstrap intervals of the report. ``--eval_split validation`` evaluates on the validation split instead (the
learning-rate sweep); ``--lr_scales`` runs each method at several multiples of its family's learning rate and
``--lr_from SWEEP_DIR`` runs each method at the learning rate that won its sweep (highest mean validation ID
accuracy), so the test split never picks anything.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gallop.commonsense import SETS
from gallop_kernels import SCORERS

logger = logging.getLogger(__name__)

SPARSE_METHODS = tuple(SCORERS)  # every selection scorer is a sparse method
# The settings every run of one results folder must share (the grid's lists of tasks, methods, ranks and seeds may
# grow between invocations; these may not, or rows made under different protocols would be averaged together).
PROTOCOL = (
    "model",
    "steps",
    "batch_size",
    "train_examples",
    "eval_examples",
    "calib_fraction",
    "lr_sparse",
    "lr_lora",
    "lr_full",
    "generative",
    "dtype",
    "eval_split",
    "validation_examples",
    "split_seed",
    "lr_from",
    "max_new_tokens",
)
METHODS = (*SPARSE_METHODS, "lora", "dora", "full")


@dataclass
class ExperimentArguments:
    model: str = field(default="smollm2", metadata={"help": "'smollm2', 'gemma3-270m', a local folder or a Hub id"})
    tasks: str = field(
        default="parity,compare,next_letter,sentiment",
        metadata={
            "help": "comma list of training tasks (built-in names or JSONL files with choices); each is trained on in "
            "turn and evaluated as ID, the others as OOD"
        },
    )
    probe_tasks: str = field(
        default="capitals,antonyms,plurals,sizes,colors,sounds",
        metadata={
            "help": "comma list of extra OOD tasks that are never trained on (knowledge the model has), or 'none'"
        },
    )
    methods: str = field(default=",".join(METHODS), metadata={"help": f"comma list of {', '.join(METHODS)}"})
    ranks: str = field(
        default="2,8",
        metadata={
            "help": "LoRA ranks that set the budgets: every sparse method trains as many entries as LoRA of that rank"
        },
    )
    seeds: str = field(default="0", metadata={"help": "comma list of seeds"})
    out: str = field(default="runs/experiment", metadata={"help": "the results folder (results.jsonl, report.md)"})
    quick: bool = field(default=False, metadata={"help": "two tasks, two methods, a few steps, tiny evaluation"})
    steps: int = field(default=40, metadata={"help": "optimizer steps per run"})
    batch_size: int = field(default=8, metadata={"help": "training batch size"})
    train_examples: int = field(default=256, metadata={"help": "training examples per task"})
    eval_examples: int = field(default=32, metadata={"help": "test examples per task"})
    calib_fraction: float = field(default=0.25, metadata={"help": "d_s: fraction of the training set to calibrate on"})
    lr_sparse: float = field(default=1e-4, metadata={"help": "learning rate of the sparse methods"})
    lr_lora: float = field(default=1e-3, metadata={"help": "learning rate of LoRA and DoRA"})
    lr_full: float = field(default=1e-5, metadata={"help": "learning rate of full fine-tuning"})
    validation_examples: int = field(
        default=64, metadata={"help": "validation items per set (commonsense sets and --choices_column data)"}
    )
    split_seed: int = field(default=0, metadata={"help": "the seed of the train/validation/test split of each set"})
    eval_split: str = field(
        default="test",
        metadata={"help": "the split to evaluate on: test, or validation (the learning-rate sweep)"},
    )
    lr_scales: str = field(
        default="1",
        metadata={"help": "comma list of multiples of each method's learning rate to run (a sweep), e.g. 0.3,1,3,10"},
    )
    lr_from: str = field(
        default="",
        metadata={"help": "a sweep's results folder: each method runs at the learning rate that won there"},
    )
    question_column: str = field(default="question", metadata={"help": "user multiple-choice data: question column"})
    choices_column: str = field(
        default="",
        metadata={
            "help": "user multiple-choice data: the column holding the list of choices, or a comma list of "
            "columns (one per option); set it to read --tasks files/folders through gallop.commonsense"
        },
    )
    answer_column: str = field(
        default="answer", metadata={"help": "user multiple-choice data: answer column (index, letter or text)"}
    )
    max_new_tokens: int = field(default=24, metadata={"help": "greedy generation length (--generative)"})
    generative: bool = field(
        default=False,
        metadata={"help": "also score OOD sets by greedy generation (exact match), where collapse shows; slower"},
    )
    dtype: str = field(default="fp32", metadata={"help": "weights dtype", "choices": ["auto", "bf16", "fp16", "fp32"]})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})

    def apply_quick(self) -> None:
        if self.quick:
            commonsense = all(t in SETS for t in self.task_list())
            self.tasks = ",".join(self.task_list()[:2])
            self.probe_tasks = "none" if commonsense else "capitals"
            if commonsense:
                self.validation_examples, self.max_new_tokens = 4, 4
            self.methods = ",".join([m for m in self.method_list() if m in ("gallop", "lora")][:2] or ["gallop"])
            self.ranks = self.ranks.split(",")[0]
            self.steps, self.train_examples, self.eval_examples = 3, 16, 4
            self.batch_size = min(self.batch_size, 4)

    def task_list(self) -> list[str]:
        return _expand([t.strip() for t in self.tasks.split(",") if t.strip()])

    def probe_list(self) -> list[str]:
        if self.probe_tasks in ("", "none"):
            return []
        return [t for t in _expand([t.strip() for t in self.probe_tasks.split(",")]) if t not in self.task_list()]

    @property
    def mc_names(self) -> set[str]:
        """The evaluation names scored as multiple-choice data (commonsense sets, ``--choices_column`` data)."""
        return {_task_name(t) for t in self.task_list() + self.probe_list() if _is_multiple_choice(t, self)}

    def lr_scale_list(self) -> list[float]:
        return [float(x) for x in self.lr_scales.split(",") if x.strip()]

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def rank_list(self) -> list[int]:
        return [int(r) for r in self.ranks.split(",") if r.strip()]

    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.split(",") if s.strip()]


def _expand(names: list[str]) -> list[str]:
    """``commonsense`` stands for the eight sets of ``gallop.commonsense.SETS``."""
    out: list[str] = []
    for n in names:
        out += [s for s in SETS if s not in out] if n == "commonsense" else ([n] if n not in out else [])
    return out


@dataclass
class ReportArguments:
    out: str = field(default="runs/experiment", metadata={"help": "the experiment folder holding results.jsonl"})


# ------------------------------------------------------------------------------------------------ checks and data
def check(args: ExperimentArguments) -> None:
    """Every check that needs no model: unknown methods, tasks without choices, bad numbers."""
    from gallop.models import check_device, check_dtype
    from gallop.tasks import TASKS, available_examples

    unknown = [m for m in args.method_list() if m not in METHODS]
    if unknown or not args.method_list():
        raise ValueError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not args.task_list():
        raise ValueError("--tasks is empty: name at least one training task")
    if any(t in SETS for t in args.task_list() + args.probe_list()):
        from gallop.commonsense import INSTALL_HINT, commonsense_available

        if not commonsense_available():
            raise ValueError(f"--tasks/--probe_tasks name commonsense sets, but they are not installed: {INSTALL_HINT}")
    if args.eval_split not in ("test", "validation"):
        raise ValueError(f"--eval_split must be test or validation, got {args.eval_split!r}")
    if not args.lr_scale_list() or any(not x > 0 for x in args.lr_scale_list()):
        raise ValueError(f"--lr_scales must be positive numbers, got {args.lr_scales!r}")
    if args.lr_from and not (Path(args.lr_from) / "results.jsonl").is_file():
        raise ValueError(f"--lr_from {args.lr_from!r} holds no results.jsonl: run the sweep into that folder first")
    for t in args.task_list() + args.probe_list():
        if t in SETS or (args.choices_column and Path(t).exists()):
            continue
        if t not in TASKS and not Path(t).is_file():
            raise ValueError(f"task {t!r} is neither a built-in task ({', '.join(TASKS)}) nor a JSONL file")
        if Path(t).is_file() and t not in TASKS:
            from gallop.data import load_examples

            if all(len(e.choices) < 2 for e in load_examples(t)):
                raise ValueError(
                    f"{t}: the task file has no multiple-choice records (choices + label), so accuracy "
                    f"cannot be measured on it"
                )
        elif t in args.task_list() and available_examples(t, "train", args.train_examples) < args.train_examples:
            raise ValueError(f"--train_examples {args.train_examples} is more than task {t!r} has")
    if not args.rank_list() or any(r < 1 for r in args.rank_list()):
        raise ValueError(f"--ranks must be positive ints, got {args.ranks!r}")
    for name in ("steps", "batch_size", "train_examples", "eval_examples", "validation_examples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive int")
    if not 0 < args.calib_fraction <= 1:
        raise ValueError(f"--calib_fraction must be in (0, 1], got {args.calib_fraction}")
    for name in ("lr_sparse", "lr_lora", "lr_full"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be positive")
    check_dtype(args.dtype)
    check_device("cuda" if args.device == "auto" and _cuda() else ("cpu" if args.device == "auto" else args.device))
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a file; pass a folder path")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _multiple_choice(task: str, args: ExperimentArguments):
    """A commonsense set's or a user's multiple-choice data's seeded splits (read once per process)."""
    key = (
        task,
        args.eval_examples,
        args.validation_examples,
        args.split_seed,
        args.question_column,
        args.choices_column,
        args.answer_column,
    )
    if key not in _SPLITS:
        from gallop.commonsense import load_multiple_choice, load_set, split_items

        items = (
            load_set(task)
            if task in SETS
            else load_multiple_choice(
                task, question=args.question_column, choices=args.choices_column, answer=args.answer_column
            )
        )
        _SPLITS[key] = split_items(
            items, test=args.eval_examples, validation=args.validation_examples, seed=args.split_seed
        )
    return _SPLITS[key]


_SPLITS: dict[tuple, Any] = {}


def _is_multiple_choice(task: str, args: ExperimentArguments) -> bool:
    return task in SETS or bool(args.choices_column and Path(task).exists())


def _examples(task: str, split: str, n: int, args: ExperimentArguments | None = None):
    from gallop.data import load_examples
    from gallop.tasks import TASKS, task_examples

    if args is not None and _is_multiple_choice(task, args):
        splits = _multiple_choice(task, args)
        return splits.train[:n] if split == "train" else splits.get(args.eval_split)
    if task in TASKS:
        return task_examples(task, split, n)
    rows = load_examples(task)
    cut = max(1, len(rows) // 5)
    return (rows[:-cut] if split == "train" else [r for r in rows[-cut:] if len(r.choices) > 1])[:n]


def _task_name(task: str) -> str:
    return task if task in SETS or "/" not in task and "." not in task else Path(task.rstrip("/")).stem


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_all(model, tokenizer, args: ExperimentArguments, evals: dict[str, list]) -> dict[str, Any]:
    """Accuracy on every evaluation set (``acc``), and with ``--generative`` the generative accuracy
    (``exact_match``). Multiple-choice data (commonsense sets, ``--choices_column``) is scored by length-normalized
    log-likelihood and its generations parsed for the option; it also keeps per-item correctness (``items``:
    ``{"mc": [...], "gen": [...]}`` per set) and the fraction of generations that give no option (``no_answer``).
    Built-in synthetic tasks keep the summed log-likelihood and exact match."""
    from gallop.commonsense import parse_choice
    from gallop.evaluation import accuracy, exact_match, generate_texts, normalized_predictions

    acc: dict[str, float] = {}
    gen: dict[str, float] = {}
    items: dict[str, dict[str, list[int]]] = {}
    no_answer: dict[str, float] = {}
    for name, examples in evals.items():
        if name not in args.mc_names:
            acc[name] = accuracy(model, tokenizer, examples)
            if args.generative:
                gen[name] = exact_match(model, tokenizer, examples, max_new_tokens=args.max_new_tokens)
            continue
        right = [int(p == ex.label) for p, ex in zip(normalized_predictions(model, tokenizer, examples), examples)]
        acc[name] = sum(right) / len(right)
        items[name] = {"mc": right}
        if args.generative:
            texts = generate_texts(model, tokenizer, examples, max_new_tokens=args.max_new_tokens)
            parsed = [parse_choice(t, ex.choices) for t, ex in zip(texts, examples)]
            items[name]["gen"] = [int(p == ex.label) for p, ex in zip(parsed, examples)]
            gen[name] = sum(items[name]["gen"]) / len(parsed)
            no_answer[name] = sum(p is None for p in parsed) / len(parsed)
    out: dict[str, Any] = {"acc": acc, "exact_match": gen if args.generative else None}
    if items:
        out["items"] = items
    if no_answer:
        out["no_answer"] = no_answer
    return out


def base_lr(args: ExperimentArguments, method: str) -> float:
    """A method's learning rate before ``--lr_scales``: the winner of its sweep (``--lr_from``) or its family's."""
    if args.lr_from:
        picked = pick_learning_rates(load_results(args.lr_from))
        if method not in picked:
            raise ValueError(f"--lr_from {args.lr_from}: the sweep has no finished run of {method!r}; sweep it first")
        return picked[method]
    return {"lora": args.lr_lora, "dora": args.lr_lora, "full": args.lr_full}.get(method, args.lr_sparse)


def pick_learning_rates(rows: list[dict]) -> dict[str, float]:
    """Per method, the learning rate with the highest validation ID accuracy averaged over the sweep's rounds and
    seeds (only rows evaluated on the validation split count; a diverged run counts as 0; ties go to the lower rate)."""
    by: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("eval_split", "test") == "validation":
            by[r["method"]][r["lr"]].append(0.0 if r.get("diverged") else r["id_acc"])
    return {m: max(sorted(lrs), key=lambda lr: statistics.fmean(lrs[lr])) for m, lrs in by.items()}


# ------------------------------------------------------------------------------------------------ one run
def lora_trainable(model, rank: int) -> int:
    """LoRA's parameter count on every linear layer but the head: ``rank * (in + out)`` per layer."""
    from gallop import eligible_parameters

    return sum(rank * (p.shape[0] + p.shape[1]) for p in eligible_parameters(model).values())


def check_budgets(model, args: ExperimentArguments) -> None:
    """Every rank's budget fits the model: refuses, before any evaluation or training, a rank whose LoRA parameter
    count (the sparse methods' ``k``) exceeds the model's eligible weights."""
    from gallop import GallopConfig, eligible_parameters

    eligible = sum(p.numel() for p in eligible_parameters(model, GallopConfig()).values())
    per_rank = lora_trainable(model, 1)
    for rank in args.rank_list():
        if rank * per_rank > eligible:
            raise ValueError(
                f"--ranks: rank {rank} sets a budget of {rank * per_rank:,} entries, more than the {eligible:,} "
                f"eligible weights of {args.model}; use ranks of at most {eligible // per_rank}"
            )


def _reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        except OSError:
            pass


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _schedule(step: int, steps: int) -> float:
    warm = max(1, steps // 10)
    return (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))


def _train(model, params, batches, lr: float, steps: int, optimizer=None) -> list[float]:
    """The loop every method shares: AdamW (or the given optimizer), linear warmup and decay, clipping at 1."""
    import torch

    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps))
    device = next(model.parameters()).device
    losses = []
    model.train()
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss became {value}: lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(value)
    model.eval()
    return losses


def run_one(
    base,
    tokenizer,
    args: ExperimentArguments,
    method: str,
    rank: int,
    train_task: str,
    seed: int,
    evals: dict[str, list],
    lr: float | None = None,
) -> dict[str, Any]:
    """Train a copy of ``base`` with ``method`` at the ``rank`` budget on ``train_task`` at learning rate ``lr``
    (default: its family's); evaluate on ``evals``."""
    import torch

    from gallop import GallopConfig, SparseAdamW, SparseModel, mean_gradients, select
    from gallop.calibrate import calibration_subset
    from gallop.data import batches

    lr = base_lr(args, method) if lr is None else lr
    torch.manual_seed(seed)
    device = next(base.parameters()).device
    _reset_peak_memory(device)
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    train = _examples(train_task, "train", args.train_examples, args)
    epochs = math.ceil(args.steps * args.batch_size / len(train)) + 1
    stream = batches(tokenizer, train, args.batch_size, epochs=epochs, seed=seed)
    budget = lora_trainable(model, rank)
    density = None
    if method in SPARSE_METHODS:
        config = GallopConfig(scorer=method, num_selected=budget, seed=seed)
        grads = None
        if config.uses_gradients:
            calib = [train[i] for i in calibration_subset(len(train), args.calib_fraction, seed)]
            grads = mean_gradients(model, batches(tokenizer, calib, args.batch_size), config, progress=False)
        selection = select(model, grads, config)
        del grads
        density = selection.density
        sparse = SparseModel(model, selection)
        trainable = sparse.num_selected
        losses = _train(
            sparse,
            sparse.trainable_parameters(),
            stream,
            lr,
            args.steps,
            SparseAdamW(sparse, lr=lr),
        )
        run_model: Any = sparse
    elif method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, use_dora=method == "dora"
            ),
        )
        params = [p for p in peft_model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        losses = _train(peft_model, params, stream, lr, args.steps)
        run_model = peft_model
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        losses = _train(model, params, stream, lr, args.steps)
        run_model = model
    train_s = time.perf_counter() - t0
    scored = evaluate_all(run_model, tokenizer, args, evals)
    record = {
        "method": method,
        "rank": rank,
        "budget": budget,
        "trainable": trainable,
        "density": density,
        "train_task": _task_name(train_task),
        "seed": seed,
        "losses": losses,
        "train_s": train_s,
        **scored,
        "wall_s": time.perf_counter() - t0,
        "peak_mem_mb": _peak_memory_mb(device),
        "lr": lr,
        "steps": args.steps,
    }
    del run_model, model
    return record


# ------------------------------------------------------------------------------------------------ metrics
def metrics(record: dict, vanilla: dict, train_task: str, eval_names: list[str]) -> dict:
    """The paper's figures of one run against the vanilla model's accuracies."""
    from .evaluate import collapse_rate, forget_ratio

    ood_names = [t for t in eval_names if t != train_task]
    ood = {t: record["acc"][t] for t in ood_names}
    vanilla_ood = statistics.fmean(vanilla["acc"][t] for t in ood_names) if ood_names else None
    ood_acc = statistics.fmean(ood.values()) if ood else None
    out = {
        "id_acc": record["acc"][train_task],
        "ood_acc": ood_acc,
        "ood": ood,
        "vanilla_id_acc": vanilla["acc"][train_task],
        "vanilla_ood_acc": vanilla_ood,
        "forget_ratio": None if vanilla_ood is None else forget_ratio(vanilla_ood, ood_acc),
        "collapse_rate": collapse_rate(ood) if ood else None,
    }
    if record.get("exact_match") is not None:
        gen_ood = {t: record["exact_match"][t] for t in ood_names}
        out["ood_exact_match"] = gen_ood
        out["collapse_rate_generative"] = collapse_rate(gen_ood) if gen_ood else None
        out["id_exact_match"] = record["exact_match"][train_task]
        if vanilla.get("exact_match"):
            out["vanilla_ood_exact_match"] = (
                statistics.fmean(vanilla["exact_match"][t] for t in ood_names) if ood_names else None
            )
    return out


def _run_id(method: str, rank: int, task: str, seed: int, lr_scale: float = 1.0) -> str:
    scale = "" if lr_scale == 1 else f"|x{lr_scale:g}"
    return f"{method}|r{rank}|{_task_name(task)}|s{seed}{scale}"


def _done(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    done = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interruption: that run is redone
            continue
        done.add(row["run_id"])
    return done


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_protocol(args: ExperimentArguments, out: Path) -> None:
    """Refuse to add runs to a results folder made under other settings (see ``PROTOCOL``)."""
    path = out / "args.json"
    if path.is_file():
        before = json.loads(path.read_text())
        for name in PROTOCOL:
            if name in before and before[name] != getattr(args, name):
                raise ValueError(
                    f"--{name}: {out} holds runs made with {name}={before[name]!r}, not {getattr(args, name)!r}; use "
                    "another --out, or the same settings, so that every row of one report is comparable"
                )
    results = out / "results.jsonl"
    if not results.is_file():
        return
    names = [_task_name(t) for t in [*args.task_list(), *args.probe_list()]]
    for line in results.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        task = row.get("train_task")
        if task in names and "ood" in row:
            want = sorted(set(names) - {task})
            if sorted(row["ood"]) != want:
                raise ValueError(
                    f"--tasks/--probe_tasks: the runs trained on {task!r} in {out} were evaluated out of distribution "
                    f"on {sorted(row['ood'])}, this invocation would use {want}; pass the same tasks and probes so "
                    "that the seeds and methods of one training task are compared on one OOD set"
                )


def run_experiment(args: ExperimentArguments) -> Path:
    """Run (or resume) the grid; returns the results file."""
    import torch

    from gallop.adapters import atomic_write_text
    from gallop.models import load_model

    args.apply_quick()
    check(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out)
    results = out / "results.jsonl"
    runs = [
        (seed, task, method, rank, scale)
        for seed in args.seed_list()
        for task in args.task_list()
        for method in args.method_list()
        for rank in ([0] if method == "full" else args.rank_list())
        for scale in args.lr_scale_list()
    ]
    check_protocol(args, out)
    done = _done(results)
    todo = [r for r in runs if _run_id(r[2], r[3], r[1], r[0], r[4]) not in done]
    logger.info("%d runs, %d already done, %d to go", len(runs), len(runs) - len(todo), len(todo))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "args.json", json.dumps(dataclasses.asdict(args), indent=1))
    if not todo:
        return results
    t0 = time.perf_counter()
    base, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    base.eval()
    check_budgets(base, args)
    eval_tasks = [*args.task_list(), *[t for t in args.probe_list() if t not in args.task_list()]]
    evals = {_task_name(t): _examples(t, "test", args.eval_examples, args) for t in eval_tasks}
    vanilla_path = out / "vanilla.json"  # per task, kept across invocations (one protocol per folder)
    vanilla = json.loads(vanilla_path.read_text()) if vanilla_path.is_file() else {"acc": {}, "exact_match": None}
    missing = [t for t in evals if t not in vanilla["acc"]]
    if missing:  # each set's vanilla evaluation runs once per results folder
        scored = evaluate_all(base, tokenizer, args, {t: evals[t] for t in missing})
        vanilla["acc"].update(scored["acc"])
        if args.generative:
            vanilla["exact_match"] = {**(vanilla["exact_match"] or {}), **scored["exact_match"]}
        for key in ("items", "no_answer"):
            if key in scored:
                vanilla[key] = {**vanilla.get(key, {}), **scored[key]}
        atomic_write_text(vanilla_path, json.dumps(vanilla, indent=1))
    logger.info("model and vanilla evaluation: %.0f s", time.perf_counter() - t0)
    for i, (seed, task, method, rank, scale) in enumerate(todo):
        run_id = _run_id(method, rank, task, seed, scale)
        lr = base_lr(args, method) * scale
        try:
            record = run_one(base, tokenizer, args, method, rank, task, seed, evals, lr)
        except FloatingPointError as e:  # a sweep's too-high rate: kept as a row, never picked
            logger.warning("%s diverged at lr %g: %s", run_id, lr, e)
            _append(
                results,
                {
                    "run_id": run_id,
                    "model": args.model,
                    "method": method,
                    "rank": rank,
                    "train_task": _task_name(task),
                    "seed": seed,
                    "lr": lr,
                    "lr_scale": scale,
                    "eval_split": args.eval_split,
                    "diverged": True,
                },
            )
            continue
        row = {
            "run_id": run_id,
            "model": args.model,
            "eval_split": args.eval_split,
            "lr_scale": scale,
            **record,
            **metrics(record, vanilla, _task_name(task), list(evals)),
        }
        _append(results, row)
        logger.info(
            "[%d/%d] %s: ID %.1f%%, OOD %.1f%%, forget ratio %.3f, %.0f s",
            i + 1,
            len(todo),
            row["run_id"],
            100 * row["id_acc"],
            100 * (row["ood_acc"] or 0),
            row["forget_ratio"] or 0,
            row["wall_s"],
        )
    write_report(out)
    return results


# ------------------------------------------------------------------------------------------------ report
def _ood_change(row: dict) -> float | None:
    if row.get("ood_acc") is None or row.get("vanilla_ood_acc") is None:
        return None
    return row["ood_acc"] - row["vanilla_ood_acc"]


def _mean_sd(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def load_results(out: str | Path) -> list[dict]:
    path = Path(out) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `gallop experiment --out {out}` first")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows:
        raise ValueError(f"{path} holds no finished runs yet")
    return rows


def write_report(out: str | Path) -> Path:
    """``report.md`` (per-method means and standard deviations over seeds and tasks) and the PNG plots; a sweep's
    folder (rows evaluated on the validation split) gets the sweep's report instead (``write_sweep_report``)."""
    rows = load_results(out)
    if any(r.get("eval_split") == "validation" for r in rows):
        return write_sweep_report(out)
    rows = [r for r in rows if not r.get("diverged")]
    out = Path(out)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["rank"])].append(r)
    order = sorted(groups, key=lambda k: (k[1], METHODS.index(k[0]) if k[0] in METHODS else 99))
    model = rows[0].get("model", "?")
    lines = [
        f"# Experiment report: {model}",
        "",
        f"{len(rows)} runs; budgets are LoRA ranks (`rank`): every sparse method trains exactly LoRA's parameter "
        "count at that rank; `full` trains everything. Accuracies in percent, mean ± standard deviation over "
        "training tasks and seeds. `OOD Δ` is the OOD accuracy minus the vanilla model's on the same OOD sets "
        "(negative: forgetting). Methods that ran on different training tasks (`tasks`) are compared fairly only "
        "in the per-task tables below.",
        "",
        "| method | rank | trainable | runs | tasks | ID acc | OOD acc | OOD Δ | forget ratio | collapse rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in order:
        g = groups[key]
        lines.append(
            f"| {key[0]} | {key[1] or '-'} | {statistics.fmean(r['trainable'] for r in g):,.0f} | {len(g)} | "
            f"{len({r['train_task'] for r in g})} | {_mean_sd([r['id_acc'] for r in g])} | "
            f"{_mean_sd([r['ood_acc'] for r in g])} | {_mean_sd([_ood_change(r) for r in g])} | "
            f"{_mean_sd([r['forget_ratio'] for r in g])} | {_mean_sd([r['collapse_rate'] for r in g])} |"
        )
    tasks = sorted({r["train_task"] for r in rows})
    lines += _table_head("ID accuracy per training task (mean over seeds)", tasks)
    for key in order:
        cells = []
        for t in tasks:
            vals = [r["id_acc"] for r in groups[key] if r["train_task"] == t]
            cells.append(_mean_sd(vals))
        lines.append(f"| {key[0]} | {key[1] or '-'} | " + " | ".join(cells) + " |")
    vanilla = {r["train_task"]: r["vanilla_id_acc"] for r in rows}
    lines.append("| vanilla | - | " + " | ".join(f"{100 * vanilla[t]:.1f}" for t in tasks) + " |")
    lines += _table_head("OOD Δ per training task (OOD accuracy minus the vanilla model's, mean over seeds)", tasks)
    for key in order:
        cells = [_mean_sd([_ood_change(r) for r in groups[key] if r["train_task"] == t]) for t in tasks]
        lines.append(f"| {key[0]} | {key[1] or '-'} | " + " | ".join(cells) + " |")
    vanilla_ood = {r["train_task"]: r["vanilla_ood_acc"] for r in rows}
    lines.append(
        "| (vanilla OOD acc) | - | "
        + " | ".join("n/a" if vanilla_ood[t] is None else f"{100 * vanilla_ood[t]:.1f}" for t in tasks)
        + " |"
    )
    lines += _per_ood_task_table(groups, order, out)
    lines += _generative_table(groups, order)
    lines += _bootstrap_tables(groups, order)
    plots = _plots(groups, order, out)
    if plots:
        lines += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _table_head(title: str, tasks: list[str]) -> list[str]:
    """A report section's heading and the header of its method x task table."""
    return ["", f"## {title}", "", "| method | rank | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]


def _per_ood_task_table(groups, order, out: Path) -> list[str]:
    """Accuracy change per evaluation task, over the runs where it was OOD: forgetting shows task by task here
    (a knowledge probe the vanilla model already answers loses points) where the mean OOD change hides it behind
    the gains that learning the answer format brings to every task."""
    path = out / "vanilla.json"
    if not path.is_file():
        return []
    vanilla = json.loads(path.read_text(encoding="utf-8")).get("acc", {})
    tasks = sorted({t for g in groups.values() for r in g for t in r.get("ood", {}) if t in vanilla})
    if not tasks:
        return []
    lines = _table_head(
        "Accuracy change per OOD task (accuracy minus the vanilla model's, mean over the runs where it is OOD)", tasks
    )
    for key in order:
        cells = [_mean_sd([r["ood"][t] - vanilla[t] for r in groups[key] if t in r.get("ood", {})]) for t in tasks]
        lines.append(f"| {key[0]} | {key[1] or '-'} | " + " | ".join(cells) + " |")
    lines.append("| (vanilla acc) | - | " + " | ".join(f"{100 * vanilla[t]:.1f}" for t in tasks) + " |")
    return lines


def _plots(groups, order, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install gallop[demo]): no plots")
        return []
    labels = [f"{m}" + (f" r{r}" if r else "") for m, r in order]
    fig, ax = plt.subplots(figsize=(7, 5))
    for (m, r), label in zip(order, labels):
        changes = [c for c in map(_ood_change, groups[(m, r)]) if c is not None]
        if not changes:
            continue
        x = statistics.fmean(changes) * 100
        y = statistics.fmean(x["id_acc"] for x in groups[(m, r)]) * 100
        ax.scatter([x], [y], s=60, marker="*" if m == "gallop" else "o")
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(0.0, color="grey", lw=1, ls="--", label="vanilla (no OOD change)")
    ax.set_xlabel("OOD accuracy change vs vanilla (points; left of the line: forgetting)")
    ax.set_ylabel("ID accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title("ID vs OOD accuracy per method (mean over tasks and seeds)", fontsize=9)
    fig.tight_layout()
    p1 = out / "id_vs_ood.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    means = [statistics.fmean(x["forget_ratio"] for x in groups[k]) for k in order]
    ax.bar(range(len(order)), means, color=["tab:red" if k[0] == "gallop" else "tab:blue" for k in order])
    ax.set_xticks(range(len(order)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("forget ratio (lower is better)")
    ax.set_title("Forgetting per method (mean over tasks and seeds)", fontsize=9)
    fig.tight_layout()
    p2 = out / "forget_ratio.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


# ------------------------------------------------------------------------------------------------ commonsense report
def _generative_table(groups, order) -> list[str]:
    """Generative scores per method (runs with ``--generative``): the paper's collapse rate, the fraction of OOD
    outputs that give no option, and the generative ID / OOD accuracy."""
    keys = [k for k in order if any(r.get("exact_match") for r in groups[k])]
    if not keys:
        return []
    lines = [
        "",
        "## Generation (greedy, parsed for the option): collapse and answers given",
        "",
        "Collapse rate: the fraction of a round's OOD sets whose generative accuracy, floored in percent, is 0. "
        "No answer: the fraction of OOD outputs that name no option.",
        "",
        "| method | rank | ID gen acc | OOD gen acc | collapse rate | no answer (OOD) |",
        "|---|---|---|---|---|---|",
    ]
    for key in keys:
        g = [r for r in groups[key] if r.get("exact_match")]
        no_answer = [
            statistics.fmean(v for t, v in r["no_answer"].items() if t != r["train_task"])
            for r in g
            if len(r.get("no_answer", {})) > 1
        ]
        ood = [statistics.fmean(r["ood_exact_match"].values()) for r in g if r.get("ood_exact_match")]
        lines.append(
            f"| {key[0]} | {key[1] or '-'} | {_mean_sd([r.get('id_exact_match') for r in g])} | {_mean_sd(ood)} | "
            f"{_mean_sd([r.get('collapse_rate_generative') for r in g])} | {_mean_sd(no_answer)} |"
        )
    return lines


def _item_scores(rows: list[dict], which: str, score: str) -> dict[str, list[float]]:
    """Per round (training set), per-item correctness averaged over seeds: ``which`` is ``id`` (the round's own
    test items) or ``ood`` (the other sets' items, concatenated in name order)."""
    by_round: dict[str, list[list[int]]] = defaultdict(list)
    for r in rows:
        items = r.get("items") or {}
        if which == "id":
            vec = items.get(r["train_task"], {}).get(score)
        else:
            parts = [items[t].get(score) for t in sorted(items) if t != r["train_task"]]
            vec = None if any(p is None for p in parts) or not parts else [x for p in parts for x in p]
        if vec is not None:
            by_round[r["train_task"]].append(vec)
    return {t: [statistics.fmean(col) for col in zip(*vecs)] for t, vecs in by_round.items()}


def _bootstrap_tables(groups, order) -> list[str]:
    """95% paired bootstrap intervals of each method's difference from LoRA and from gallop (same rank), over test
    items, on the rounds both ran, every round weighted equally (``paired_bootstrap``)."""
    from .evaluate import paired_bootstrap

    lines: list[str] = []
    for ref in ("lora", "gallop"):
        rows_out = []
        for key in order:
            ref_key = (ref, key[1])
            if key[0] == ref or ref_key not in groups:
                continue
            cells = []
            for which in ("id", "ood"):
                a, b = _item_scores(groups[key], which, "mc"), _item_scores(groups[ref_key], which, "mc")
                common = sorted(set(a) & set(b))
                if not common:
                    cells.append("n/a")
                    continue
                d, lo, hi = paired_bootstrap({t: a[t] for t in common}, {t: b[t] for t in common})
                cells.append(f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] ({len(common)} rounds)")
            if cells != ["n/a", "n/a"]:
                rows_out.append(f"| {key[0]} | {key[1] or '-'} | {cells[0]} | {cells[1]} |")
        if rows_out:
            lines += [
                "",
                f"## Difference from {ref} (points, 95% paired bootstrap interval over test items)",
                "",
                "| method | rank | ID | OOD |",
                "|---|---|---|---|",
                *rows_out,
            ]
    return lines


def write_sweep_report(out: str | Path) -> Path:
    """A learning-rate sweep's ``report.md``: every learning rate of every method with its validation ID accuracy
    and OOD change (all rows kept, diverged runs counted), the rate each method picks (``pick_learning_rates``), and
    a plot of ID accuracy against OOD change per learning rate."""
    rows = load_results(out)
    out = Path(out)
    picked = pick_learning_rates(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["rank"], r["lr"])].append(r)
    order = sorted(groups, key=lambda k: (METHODS.index(k[0]) if k[0] in METHODS else 99, k[1], k[2]))
    lines = [
        f"# Learning-rate sweep: {rows[0].get('model', '?')}",
        "",
        "Evaluated on the validation split (the test split picks nothing). Each method runs at the learning rate with "
        "the highest mean validation ID accuracy (`picked`); a diverged run counts as 0.",
        "",
        "| method | rank | lr | runs | diverged | ID acc | OOD Δ | picked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in order:
        g = [r for r in groups[key] if not r.get("diverged")]
        lines.append(
            f"| {key[0]} | {key[1] or '-'} | {key[2]:g} | {len(groups[key])} | {len(groups[key]) - len(g)} | "
            f"{_mean_sd([r['id_acc'] for r in g])} | {_mean_sd([_ood_change(r) for r in g])} | "
            f"{'yes' if picked.get(key[0]) == key[2] else ''} |"
        )
    plot = _sweep_plot(groups, order, out)
    if plot:
        lines += ["", f"![{plot.stem}]({plot.name})"]
    (out / "lr_picked.json").write_text(json.dumps(picked, indent=1), encoding="utf-8")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _sweep_plot(groups, order, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for method in dict.fromkeys(k[0] for k in order):
        pts = []
        for key in (k for k in order if k[0] == method):
            g = [r for r in groups[key] if not r.get("diverged") and _ood_change(r) is not None]
            if g:
                pts.append(
                    (
                        key[2],
                        100 * statistics.fmean(map(_ood_change, g)),
                        100 * statistics.fmean(r["id_acc"] for r in g),
                    )
                )
        if pts:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=method)
            for lr, x, y in pts:
                ax.annotate(f"{lr:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_xlabel("OOD accuracy change vs vanilla (points, validation)")
    ax.set_ylabel("ID accuracy (%, validation)")
    ax.legend(fontsize=8)
    ax.set_title("Learning-rate sweep: ID accuracy against OOD change, one point per rate", fontsize=9)
    fig.tight_layout()
    path = out / "lr_sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
