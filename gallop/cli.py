"""The ``gallop`` command line.

    gallop finetune     calibrate, select, train the selected entries (GallopTrainer), evaluate ID/OOD, save
    gallop select       phase 1 only: calibration gradients, selection, a summary of what was selected
    gallop eval         accuracy of a model (with or without an adapter) on built-in tasks or a dataset
    gallop merge        an adapter + its base model -> a plain model folder
    gallop export       a gallop adapter -> a PEFT adapter folder (PeftModel.from_pretrained loads it)
    gallop experiment   the paper's protocol: methods x training tasks x seeds, ID/OOD, forget ratio, collapse
    gallop report       tables and plots of an experiment folder

Each subcommand's arguments come from dataclasses through ``HfArgumentParser`` (``gallop <command> --help`` shows
every default). This module imports nothing heavy at the top, so ``gallop --help`` and ``--version`` are instant;
torch and transformers load when a command runs. User errors print one line (``gallop <command>: error: ...``)
and exit with status 2; nothing is written before every argument has been checked.

``select``, ``eval``, ``merge`` and ``export`` are the library's commands and import nothing from ``gallop.demo``;
``finetune``, ``experiment`` and ``report`` run the demo's jobs (imported when the command runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

COMMANDS = {
    "finetune": "calibrate, select, train the selected entries, evaluate ID/OOD, save the adapter",
    "select": "phase 1: calibration gradients + selection, with a summary",
    "eval": "accuracy of a model, with or without an adapter, on built-in tasks or a dataset",
    "merge": "write an adapter merged into its base model as a plain model folder",
    "export": "write a gallop adapter as a PEFT adapter folder",
    "experiment": "the paper's protocol: methods x training tasks x seeds, ID/OOD accuracy, forgetting",
    "report": "render report.md and plots of an experiment folder",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gallop")
    except PackageNotFoundError:  # running from a source tree that is not installed
        import re
        from pathlib import Path

        text = (Path(__file__).resolve().parents[1] / "gallop_kernels" / "__init__.py").read_text()
        match = re.search(r'__version__ = "([^"]+)"', text)
        return match.group(1) if match else "unknown"


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gallop",
        description="GaLLoP sparse fine-tuning of language models",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {c:<12}{h}" for c, h in COMMANDS.items())
        + "\n\n`gallop <command> --help` shows a command's arguments and their defaults.",
    )
    p.add_argument("--version", action="version", version=f"gallop {_version()}")
    p.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of: " + ", ".join(COMMANDS))
    return p


def parse_arguments(prog: str, types: tuple, argv: Sequence[str], defaults: dict | None = None) -> list:
    """One instance of each dataclass in ``types`` from the command line ``argv`` of ``gallop <prog>``, through
    ``HfArgumentParser``. An option two dataclasses share (``--seed``: GallopConfig's and TrainingArguments') is one
    option, and every dataclass with that field gets its value."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(types, prog=f"gallop {prog}", description=COMMANDS[prog], conflict_handler="resolve")
    if defaults:
        parser.set_defaults(**defaults)
    namespace = vars(parser.parse_args(list(argv)))
    return [
        t(**{f.name: namespace[f.name] for f in dataclasses.fields(t) if f.init and f.name in namespace}) for t in types
    ]


def _setup_logging() -> None:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------------ finetune
def cmd_finetune(argv: Sequence[str]) -> int:
    from transformers import TrainingArguments

    from .config import GallopConfig
    from .demo.finetune import DataArguments, FinetuneArguments, default_output_dir, finetune, training_defaults
    from .models import ModelArguments

    model_args, data, config, args, training = parse_arguments(
        "finetune",
        (ModelArguments, DataArguments, GallopConfig, FinetuneArguments, TrainingArguments),
        argv,
        training_defaults(),
    )
    # transformers >= 5 fills a missing --output_dir with "trainer_output" (in the current folder): ours is runs/
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        training.output_dir = default_output_dir(data)
    m = finetune(model_args, data, config, args, training)
    _print_finetune(m, config, training)
    return 0


def _pct(v) -> str:
    return "   n/a" if v is None else f"{100 * v:5.1f}%"


def _print_finetune(m: dict, config, training) -> None:
    v, t = m["vanilla"], m["finetuned"]
    print(
        f"\nGaLLoP ({config.scorer}, {config.budget} budget): {m['num_selected']:,} of {m['num_eligible']:,} eligible "
        f"weights trained ({100 * m['density_eligible']:.2f}% of the eligible weights, "
        f"{100 * m['density_all']:.3f}% of all parameters), {training.max_steps} steps on '{m['train']}'"
    )
    width = max(18, *(len(n) + 7 for n in [m["train"], *v["ood"]]))
    print(f"{'task (accuracy)':<{width}}{'vanilla':>9}{'GaLLoP':>9}")
    print(f"{m['train'] + ' (ID)':<{width}}{_pct(v['id']):>9}{_pct(t['id']):>9}")
    for name in v["ood"]:
        print(f"{name + ' (OOD)':<{width}}{_pct(v['ood'][name]):>9}{_pct(t['ood'][name]):>9}")
    if v["ood"]:
        print(f"{'OOD mean':<{width}}{_pct(v['ood_mean']):>9}{_pct(t['ood_mean']):>9}")
        print(f"forget ratio {m['forget_ratio']:.3f}; collapse rate {m['collapse_rate']:.3f}")
    tm = m["timings_s"]
    print(
        f"time: load {tm['load_s']:.0f} s, calibration {tm['calibration_s']:.0f} s, selection "
        f"{tm['selection_s']:.1f} s, training {tm['train_s']:.0f} s ({m['train_tokens_per_s']:.0f} tokens/s), "
        f"evaluation {tm['eval_vanilla_s'] + tm['eval_tuned_s']:.0f} s"
    )
    print(f"wrote {training.output_dir}/adapter and metrics.json" + (" and loss.png" if m.get("loss_png") else ""))


# ------------------------------------------------------------------------------------------------ select
@dataclass
class SelectArguments:
    calib_examples: int = field(default=64, metadata={"help": "training examples whose mean gradient is used"})
    batch_size: int = field(default=8, metadata={"help": "calibration batch size"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})


def cmd_select(argv: Sequence[str]) -> int:
    import time

    from gallop_kernels import SCORERS

    from . import mean_gradients, select
    from .calibrate import CalibrationArguments
    from .config import GallopConfig
    from .data import DataArguments, batches, check_dataset_spec, load_examples
    from .models import ModelArguments, load_model
    from .tasks import TASKS, task_examples

    model_args, data, config, calib, args = parse_arguments(
        "select", (ModelArguments, DataArguments, GallopConfig, CalibrationArguments, SelectArguments), argv
    )
    for name in ("calib_examples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive int, got {getattr(args, name)}")
    if calib.calib_slices < 1:
        raise ValueError(f"--calib_slices must be a positive int, got {calib.calib_slices}")
    if data.dataset is not None:
        check_dataset_spec(data.dataset, "--dataset")
    elif data.task not in TASKS:
        raise ValueError(f"--task must be a built-in task ({', '.join(TASKS)}), or pass --dataset; got {data.task!r}")
    t0 = time.perf_counter()
    model, tok = load_model(
        model_args.model,
        dtype=model_args.dtype,
        device=model_args.resolved_device(),
        revision=model_args.revision,
        quantization=model_args.quantization,
    )
    t_load = time.perf_counter() - t0
    if data.dataset is None:
        examples, source = task_examples(data.task, "train", args.calib_examples), data.task
    else:
        rows = load_examples(data.dataset, tok, split=data.split, columns=data.columns())
        examples, source = rows[: args.calib_examples], data.dataset
    t0 = time.perf_counter()
    grads = mean_gradients(
        model,
        list(batches(tok, examples, args.batch_size)),  # a list: --calib_slices reads it once per slice
        config,
        progress=not args.quiet,
        reduction=calib.calib_reduction,
        accumulate=calib.accumulate,
        slices=calib.calib_slices,
    )
    t_grad = time.perf_counter() - t0
    t0 = time.perf_counter()
    chosen = select(model, grads, config)
    t_select = time.perf_counter() - t0
    print(f"\n{chosen}")
    print(
        f"that is {100 * chosen.density:.3f}% of the eligible weights and {100 * chosen.density_of_all(model):.3f}% "
        f"of all {sum(p.numel() for p in model.parameters()):,} parameters; calibrated on {len(examples)} "
        f"'{source}' examples"
    )
    _print_groups("selected fraction per module type", chosen.fraction_by("module"))
    _print_groups("selected fraction per layer", chosen.fraction_by("layer"))
    print("\noverlap with other scorers at the same k (|this ∩ other| / k):")
    for other in [s for s in SCORERS if s != config.scorer]:
        other_config = dataclasses.replace(config, scorer=other)
        if calib.calib_slices > 1 and other_config.uses_gradients:
            print(f"  {other:<10}    n/a (calibrated in slices: only {config.scorer!r}'s candidates were kept)")
            continue
        o = select(model, grads if other_config.uses_gradients else None, other_config)
        print(f"  {other:<10} {100 * chosen.overlap(o):6.2f}%")
    print(f"\ntime: load {t_load:.1f} s, calibration gradients {t_grad:.1f} s, selection {t_select:.2f} s")
    return 0


def _print_groups(title: str, groups) -> None:
    print(f"\n{title}:")
    for name, (s, e) in groups.items():
        bar = "#" * min(50, round(50 * s / max(1, e) / 0.05))  # full bar at 5%
        print(f"  {name:<12} {s:>10,} / {e:>12,}  {100 * s / max(1, e):6.3f}%  {bar}")


# ------------------------------------------------------------------------------------------------ eval / merge / export
def _check_adapter(value: str, flag: str = "--adapter") -> None:
    """Read a local adapter folder before any model loads (a Hub id, ``owner/name``, is fetched later)."""
    from pathlib import Path

    from .adapters import read_adapter

    path = Path(value).expanduser()
    if path.exists() or value.startswith((".", "/", "~")) or value.count("/") != 1:
        if not path.is_dir():
            raise FileNotFoundError(
                f"{flag} {value!r} is not a folder: pass an adapter folder or a Hub id (owner/name)"
            )
        read_adapter(path)  # raises naming the folder and what is wrong


@dataclass
class EvalArguments:
    adapter: str | None = field(default=None, metadata={"help": "a gallop adapter folder (or Hub id) to apply"})
    tasks: str | None = field(
        default=None,
        metadata={"help": "comma list of built-in tasks, 'all' or 'none' (default: all, or none with --dataset)"},
    )
    examples: int = field(default=48, metadata={"help": "test examples per task (the first ones of --dataset)"})
    generative: bool = field(default=False, metadata={"help": "also greedy-decode and score exact match"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})


def _eval_task_names(tasks: str | None, dataset: str | None) -> list[str]:
    """The built-in tasks ``--tasks`` names (its default: every task without --dataset, none with it)."""
    from .tasks import TASKS

    if tasks is None:
        tasks = "none" if dataset is not None else "all"
    if tasks == "none":
        names = []
    else:
        names = list(TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks names unknown tasks {unknown}; built-in tasks: {', '.join(TASKS)}")
    if not names and dataset is None:
        raise ValueError("--tasks none leaves nothing to evaluate: name built-in tasks or pass --dataset")
    return names


def cmd_eval(argv: Sequence[str]) -> int:
    from .data import DatasetArguments, check_dataset_spec, dataset_label, load_examples
    from .evaluation import accuracy, exact_match
    from .models import ModelArguments, load_model
    from .sparse import SparseModel
    from .tasks import task_examples

    model_args, data, args = parse_arguments(
        "eval", (ModelArguments, DatasetArguments, EvalArguments), argv, {"split": "test"}
    )
    names = _eval_task_names(args.tasks, data.dataset)
    if args.examples < 1:
        raise ValueError(f"--examples must be a positive int, got {args.examples}")
    if data.dataset is not None:
        check_dataset_spec(data.dataset, "--dataset")
    if args.adapter:
        _check_adapter(args.adapter)
    model, tok = load_model(
        model_args.model,
        dtype=model_args.dtype,
        device=model_args.resolved_device(),
        revision=model_args.revision,
        quantization=model_args.quantization,
    )
    sets = {t: task_examples(t, "test", args.examples) for t in names}
    if data.dataset is not None:
        rows = load_examples(data.dataset, tok, split=data.split, columns=data.columns())[: args.examples]
        if not args.generative and not any(len(ex.choices) > 1 for ex in rows):
            raise ValueError(
                f"--dataset {data.dataset!r} has no multiple-choice records (prompt/choices/label), so there is no "
                f"accuracy by likelihood to measure: pass --generative true to score exact match"
            )
        label = dataset_label(data.dataset)
        sets[f"{label} (dataset)" if label in sets else label] = rows
    if args.adapter:
        SparseModel.from_pretrained(model, args.adapter)
    width = max(14, *(len(name) + 2 for name in sets))
    print(f"{'task':<{width}}{'accuracy':>10}" + (f"{'exact match':>13}" if args.generative else ""))
    for name, ex in sets.items():
        scored = [e for e in ex if len(e.choices) > 1]  # a record with one answer has no choice to rank
        acc = accuracy(model, tok, scored, progress=not args.quiet) if scored else None
        line = f"{name:<{width}}{_pct(acc):>10}"
        if args.generative:
            line += f"{_pct(exact_match(model, tok, ex, progress=not args.quiet)):>13}"
        print(line)
    return 0


@dataclass
class AdapterArguments:
    adapter: str = field(metadata={"help": "the gallop adapter folder (or Hub id)"})
    out: str = field(metadata={"help": "the folder to write"})


def cmd_merge(argv: Sequence[str]) -> int:
    from .adapters import check_writable_folder
    from .models import ModelArguments, load_model
    from .sparse import SparseModel

    model_args, args = parse_arguments("merge", (ModelArguments, AdapterArguments), argv)
    check_writable_folder(args.out, "--out")
    _check_adapter(args.adapter)
    model, tok = load_model(
        model_args.model,
        dtype=model_args.dtype,
        device=model_args.resolved_device(),
        revision=model_args.revision,
        quantization=model_args.quantization,
    )
    merged: Any = SparseModel.from_pretrained(model, args.adapter).merge_and_unload()
    merged.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote the merged model to {args.out}")
    return 0


@dataclass
class ExportArguments:
    peft: bool = field(default=True, metadata={"help": "export as a PEFT (Supertuning) adapter"})


def cmd_export(argv: Sequence[str]) -> int:
    from .adapters import check_writable_folder, export_peft
    from .models import ModelArguments, load_model

    model_args, args, _ = parse_arguments("export", (ModelArguments, AdapterArguments, ExportArguments), argv)
    check_writable_folder(args.out, "--out")
    _check_adapter(args.adapter)
    model, _tok = load_model(
        model_args.model,
        dtype=model_args.dtype,
        device=model_args.resolved_device(),
        revision=model_args.revision,
        quantization=model_args.quantization,
    )
    report = export_peft(args.adapter, model, args.out)
    print(
        f"wrote a PEFT {report['peft_type']} adapter to {args.out} ({report['num_selected']:,} entries, "
        f"sparsity {report['sparsity']:.6f}); it reproduces the gallop weights exactly: {report['exact']}"
    )
    return 0


def cmd_experiment(argv: Sequence[str]) -> int:
    from .demo.experiment import ExperimentArguments, run_experiment

    (args,) = parse_arguments("experiment", (ExperimentArguments,), argv)
    run_experiment(args)
    return 0


def cmd_report(argv: Sequence[str]) -> int:
    from .demo.experiment import ReportArguments, write_report

    (args,) = parse_arguments("report", (ReportArguments,), argv)
    path = write_report(args.out)
    print(f"wrote {path}")
    return 0


_RUN = {
    "finetune": cmd_finetune,
    "select": cmd_select,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "export": cmd_export,
    "experiment": cmd_experiment,
    "report": cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        top.parse_args(argv[:1] or ["--help"])  # prints help / version, or the "invalid choice" error; exits
    command, rest = argv[0], argv[1:]
    _setup_logging()
    try:
        return _RUN[command](rest)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, ImportError) as e:
        print(f"gallop {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
