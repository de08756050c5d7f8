"""The device run: every GPU figure the project needs, in one command that cannot overrun or lose what it measured.

    PYTHONPATH=. python bench/gpu_check.py --out $OUT              # on the GPU machine (`make gpu-check`)
    PYTHONPATH=. python bench/gpu_check.py --rehearsal --out DIR   # the same steps on the CPU, tiny shapes (CI)

A device is lent for 15 minutes in all and one command may run 10, so the run is a fixed sequence of steps, each a
child process under its own time budget (killed when it overruns), in the order of what matters most:

1. ``tests`` (120 s): the kernel tests on CUDA tensors and the GPU-only tests (``-m "gpu or not slow"``), one line
   per test as it ends. Tests that run the Triton kernels on CPU tensors need Triton's interpreter, which a CUDA
   machine does not use: they are skipped there with that reason (``tests/conftest.py``), never failed.
2. ``kernels`` (60 s): every kernel against its torch baseline (``bench/kernels.py``, JSON after every size).
3. ``train_1.1b`` (75 s): a training step of GaLLoP 1%, LoRA and full fine-tuning at the 1.1B shape
   (``bench/train_step.py``, JSON after every method).
4. ``weight_grad`` (30 s): ``weight_grad_at``'s dense vs sampled crossover on CUDA (``bench/weight_grad.py``).
5. ``train_8b`` (75 s): the same three methods at the LLaMA3-8B shape, gradient checkpointing.

Each step writes ``NN-name.txt`` (its output) and its own result files under ``NN-name/`` as soon as it ends, and
``summary.json`` is rewritten after every step, so a run cut short still returns everything before the cut. The
budgets add up to at most ``TOTAL_S`` (6 minutes). ``--rehearsal`` runs the same steps on the CPU at tiny shapes
(the tests step without the interpreter, as on the GPU machine, so the skips are rehearsed too) and fails unless
every step ran, passed, wrote its files and kept to its budget. Only the standard library is imported here: the
device machine has torch, triton, transformers, peft, pytest and matplotlib, and nothing else is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 360  # the whole run; one device command may take 600 s, and a rerun must fit in the lease
TEST_PATHS = [
    "tests/kernels",
    "tests/contracts/test_memory_safety.py",
    "tests/contracts/test_properties.py",
    "tests/gallop/test_sparse.py",
    "tests/gallop/test_layers.py",
    "tests/gallop/test_checkpointing.py",
    "tests/gallop/test_optim.py",
]


@dataclass(frozen=True)
class Step:
    name: str
    gpu: str  # the command line after ``python`` (shell quoting); ``{out}`` is the step's folder
    rehearsal: str
    budget_s: float  # on the GPU
    rehearsal_budget_s: float  # on the CI machine (2 cores)
    outputs: tuple[str, ...] = ()  # files the step must write into its folder


# -v: one line per test as it ends, so a step cut at its budget still reports every test it ran
_TESTS = "-m pytest -v --tb=short -p no:cacheprovider --junitxml={out}/junit.xml -m 'gpu or not slow' " + " ".join(
    TEST_PATHS
)
_TINY = "--shape tiny --steps 1 --warmup 1 --out {out}"
# GaLLoP first, then its baselines (each method is a fresh process: imports, CUDA init and Triton compiles included)
_STEP = "--methods gallop-1%,lora,full --steps 3 --warmup 1"
STEPS = [
    Step(
        "tests",
        _TESTS,
        _TESTS,  # the same selection: without the interpreter the Triton-on-CPU tests skip, as on the device
        budget_s=120,
        rehearsal_budget_s=240,
        outputs=("junit.xml",),
    ),
    Step(
        "kernels",
        "bench/kernels.py --out {out}",
        "bench/kernels.py --device cpu --quick --out {out}",
        budget_s=60,
        rehearsal_budget_s=120,
        outputs=("kernels.json",),
    ),
    Step(
        "train_1.1b",
        f"bench/train_step.py --shape 1.1b --device cuda {_STEP} --out {{out}}",
        f"bench/train_step.py {_TINY} --methods gallop-1%,lora,full",
        budget_s=75,
        rehearsal_budget_s=240,
        outputs=("train_step.json",),
    ),
    Step(
        "weight_grad",
        "bench/weight_grad.py --device cuda --out {out}",
        "bench/weight_grad.py --quick --reps 1 --out {out}",
        budget_s=30,
        rehearsal_budget_s=60,
        outputs=("weight_grad.json",),
    ),
    Step(
        "train_8b",
        f"bench/train_step.py --shape 8b --device cuda {_STEP} --gradient-checkpointing --out {{out}}",
        f"bench/train_step.py {_TINY} --methods gallop-1%,lora,full --gradient-checkpointing",
        budget_s=75,
        rehearsal_budget_s=180,
        outputs=("train_step.json",),
    ),
]
assert sum(s.budget_s for s in STEPS) <= TOTAL_S


def _env(step: Step, rehearsal: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if step.name == "tests":
        # as on the GPU machine: no interpreter, so tests that need it are skipped (tests/conftest.py)
        env.pop("TRITON_INTERPRET", None)
        env["GALLOP_TESTS_WITHOUT_INTERPRETER"] = "1"
    if rehearsal and step.name != "tests":
        env.setdefault("GALLOP_BACKEND", "reference")  # the interpreter at bench sizes would not fit the budget
    return env


def run_step(index: int, step: Step, out: Path, rehearsal: bool, deadline: float) -> dict:
    """Run one step in a child process under its budget; returns its record (also written beside its output)."""
    folder = out / f"{index:02d}-{step.name}"
    folder.mkdir(parents=True, exist_ok=True)
    argv = [a.format(out=folder) for a in shlex.split(step.rehearsal if rehearsal else step.gpu)]
    budget = step.rehearsal_budget_s if rehearsal else step.budget_s
    timeout = max(1.0, min(budget, deadline - time.monotonic()))
    log = out / f"{index:02d}-{step.name}.txt"
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ python {' '.join(argv)}\n")
        f.flush()
        # its own session, so an overrun kills the whole tree (the train-step bench starts one child per method)
        env = _env(step, rehearsal)
        child = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc, timed_out = child.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            rc, timed_out = 124, True
            f.write(f"\n[gpu_check] killed after {timeout:.0f} s (budget {budget:.0f} s), with its children\n")
    seconds = time.monotonic() - t0
    missing = [name for name in step.outputs if not (folder / name).is_file()]
    record = {
        "step": step.name,
        "rc": rc,
        "timed_out": timed_out,
        "seconds": round(seconds, 1),
        "budget_s": budget,
        "missing_outputs": missing,
        "log": log.name,
        "tail": log.read_text(errors="replace")[-1500:],
    }
    (folder / "step.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the folder every step writes into ($OUT on the device)")
    p.add_argument("--rehearsal", action="store_true", help="the same steps on the CPU at tiny shapes (CI)")
    p.add_argument("--steps", default=None, help="comma list of step names to run (default: all, in order)")
    args = p.parse_args(argv)
    chosen = [s for s in STEPS if args.steps is None or s.name in args.steps.split(",")]
    if args.steps and len(chosen) != len(args.steps.split(",")):
        p.error(f"--steps must name steps among {', '.join(s.name for s in STEPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(s.rehearsal_budget_s if args.rehearsal else s.budget_s for s in chosen)
    deadline = time.monotonic() + total
    summary: dict = {"rehearsal": args.rehearsal, "total_budget_s": total, "steps": []}
    for i, step in enumerate(chosen, 1):
        record = run_step(i, step, out, args.rehearsal, deadline)
        summary["steps"].append({k: v for k, v in record.items() if k != "tail"})
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        state = "TIMEOUT" if record["timed_out"] else ("ok" if record["rc"] == 0 else f"rc={record['rc']}")
        took = f"{record['seconds']:6.1f} s (budget {record['budget_s']:.0f} s)"
        print(f"[gpu_check] {i}/{len(chosen)} {step.name:<12} {state:<8} {took}", flush=True)
        if record["rc"] != 0:
            print(record["tail"], flush=True)
    bad = [r for r in summary["steps"] if r["rc"] != 0 or r["missing_outputs"]]
    summary["ok"] = not bad
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[gpu_check] {'all steps passed' if not bad else f'{len(bad)} step(s) failed'}; wrote {out}/summary.json")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
