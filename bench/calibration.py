"""Low-memory calibration: peak memory of each ``mean_gradients`` accumulator mode and of calibration in slices,
how much of the fp32 selection each one keeps, and the memory planning table for 8B and 70B models.

    python bench/calibration.py                 # CPU: SmolLM2-135M (make bench), every run
    python bench/calibration.py --runs fp32:1,fp32:8
    python bench/calibration.py --device cuda

A run is ``mode:slices`` (``accumulate=mode``, ``slices=S``), each in its own process: peak = VmHWM on the CPU,
max_memory_allocated on CUDA, both over the RSS / allocation after the model is loaded, so the figure is the
accumulators (of the largest slice) + the candidates + one layer's gradient + activations. Each run also reports
its accumulator bytes from the buffers it allocated (the largest slice's sums plus the candidates' indices and
values). The 1% selections are compared with the fp32 one-pass selection (``fp32:1``, read from ``--out`` when it is
not among the runs). Writes ``row-<mode>-s<S>.json`` per run and ``calibration.json`` (every row in ``--out``, and
the planning table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("fp32", "bf16", "cpu")
RUNS = ("fp32:1", "bf16:1", "cpu:1", "fp32:2", "fp32:4", "fp32:8")
BYTES_PER_ELIGIBLE = {"fp32": 4.0, "bf16": 2.0, "cpu": 0.0}  # accumulator bytes on the device, per eligible weight


def child(run: str, device: str, examples: int, out: Path) -> dict:
    import time

    import torch

    from gallop import GallopConfig, GradientCandidates, eligible_parameters, mean_gradients, select
    from gallop.data import batches
    from gallop.models import load_model
    from gallop.tasks import task_examples

    dev = torch.device(device)
    model, tok = load_model("smollm2", dtype="fp32", device=device)
    data = list(batches(tok, task_examples("sentiment", "train", examples), 8))
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    eligible = sum(p.numel() for p in eligible_parameters(model).values())
    largest = max(p.numel() * p.element_size() for p in eligible_parameters(model).values())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss()
    mode, slices = run.split(":")
    config = GallopConfig(density=0.01)
    t0 = time.perf_counter()
    grads = mean_gradients(model, data, config, accumulate=mode, progress=False, slices=int(slices))
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _hwm()) - base
    params = eligible_parameters(model)
    if isinstance(grads, GradientCandidates):
        largest_slice = max(sum(params[n].numel() for n in part) for part in grads.slices)
        passes, candidate_bytes = len(grads.slices), grads.nbytes
    else:
        largest_slice, passes, candidate_bytes = eligible, 1, 0
    sel = select(model, grads, config)
    torch.save({n: i.cpu() for n, i in sel.items()}, out / f"selection-{mode}-s{slices}.pt")
    return {
        "run": run,
        "mode": mode,
        "slices": int(slices),
        "passes": passes,
        "seconds": seconds,
        "peak_extra_mib": peak / 2**20,
        "weights_mib": weights_bytes / 2**20,
        "eligible": eligible,
        "largest_tensor_mib": largest / 2**20,
        "largest_slice": largest_slice,
        # what calibration holds on the device at its peak in every mode: the fp32 mean gradients of the largest
        # slice (of every eligible weight with one pass: the result) and the candidates
        "accumulator_mib": (4 * largest_slice + candidate_bytes) / 2**20,
        "candidate_mib": candidate_bytes / 2**20,
        "accumulator_mib_formula": BYTES_PER_ELIGIBLE[mode] * eligible / 2**20,
        "bytes_per_eligible_measured": peak / eligible,
    }


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# Per-byte costs of the planning table (bytes per element; activations excluded: they depend on batch, sequence
# length and checkpointing). One home: docs/performance.md quotes these.
BASE_BYTES = {
    "bf16": 2.0,
    # NF4 (bitsandbytes' default: no double quantization): 4 bits per weight + one fp32 absmax per block of 64
    "nf4": 0.5 + 4 / 64,
}
NF4_DOUBLE_QUANT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 8-bit absmax per 64, fp32 per 256 absmax: quoted, not tabled
NON_ELIGIBLE_BYTES = 2.0  # embeddings, norms and the head stay bf16 in both (bitsandbytes keeps the head)
MEAN_GRAD = 4  # the fp32 mean gradient of one eligible weight (the one-pass result, or one slice's at its merge)
CANDIDATE = 8  # a candidate of the sliced calibration: int32 index + fp32 mean gradient
MERGE_EXTRA = 4 + 2  # per candidate while a merge runs: select_topk's int32 positions + the taken bf16 weight
TRAINED = 28  # per selected entry: fp32 delta, base, grad, two moments, the flat gradient copy + int32 index
PLAN_SLICES = (1, 2, 4, 8, 16)


def _select_workspace(n: float, k: float) -> float:
    """The Triton select_topk's extra bytes over n elements choosing k: output 4 B/k, the bit mask n/8, per-block
    arrays 12 B per 2048 elements, candidates 1.25 x 8% of k x 12 B (<= 12 B x 32M)."""
    return 4 * k + n / 8 + 12 * n / 2048 + 12 * min(2**25, 1.25 * 0.08 * k)


def plan(
    n_params: float, hidden: int, kv: int, intermediate: int, layers: int, base: str, density: float = 0.01
) -> dict:
    """Peak bytes (GB) of each phase of a LLaMA-shaped model on a ``base`` ("bf16" or "nf4") base, at ``density``,
    with fp32 accumulators, calibrating in 1, 2, 4, 8, 16 slices (the cut ``mean_gradients`` makes)."""
    from gallop.calibrate import slice_plan

    layer = [hidden * hidden, hidden * kv, hidden * kv, hidden * hidden, *([hidden * intermediate] * 3)]
    numels = layer * layers
    n_eligible = sum(numels)
    largest = max(numels)
    k = density * n_eligible
    weights = BASE_BYTES[base] * n_eligible + NON_ELIGIBLE_BYTES * (n_params - n_eligible)
    # one layer at a time: its bf16 dense gradient, and on nf4 its de-quantized bf16 weight
    layer_temp = 2 * largest * (2 if base == "nf4" else 1)
    row = {"weights_GB": weights / 1e9}
    for slices in PLAN_SLICES:
        if slices == 1:
            peak = weights + MEAN_GRAD * n_eligible + layer_temp
        else:
            part = max(sum(numels[i] for i in r) for r in slice_plan(numels, slices))
            held = weights + MEAN_GRAD * part + CANDIDATE * k
            peak = max(held + layer_temp, held + MERGE_EXTRA * k + _select_workspace(k + part, k))
        row[f"calibration_S{slices}_GB"] = peak / 1e9
    # selecting from the one-pass result holds it; from the candidates, only they are read
    dense_select = MEAN_GRAD * n_eligible + _select_workspace(n_eligible, k) + layer_temp / 2  # (nf4: de-quantized)
    row["selection_S1_GB"] = (weights + dense_select) / 1e9
    row["selection_sliced_GB"] = (weights + (CANDIDATE + MERGE_EXTRA) * k + _select_workspace(k, k)) / 1e9
    # training: TRAINED bytes per selected entry, one layer's dense weight gradient inside weight_grad_at (and on
    # nf4 one layer's de-quantized weight)
    row["training_GB"] = (weights + TRAINED * k + layer_temp) / 1e9
    return row


PLAN_SHAPES = {  # parameters, hidden, k/v width, MLP width, layers (eligible: the 7 linear layers of every block)
    "1.1B (TinyLlama)": (1.10e9, 2048, 256, 5632, 22),
    "8B (LLaMA3)": (8.03e9, 4096, 1024, 14336, 32),
    "70B (LLaMA3)": (70.6e9, 8192, 1024, 28672, 80),
}


def planning_table() -> str:
    """The planning table as markdown (docs/performance.md)."""
    cols = [f"calibration S={s}" for s in PLAN_SLICES]
    lines = [
        "| model | base | weights | " + " | ".join(cols) + " | selection S=1 | selection S>1 | training |",
        "|---|---|" + "---|" * (len(cols) + 4),
    ]
    for name, shape in PLAN_SHAPES.items():
        for base in BASE_BYTES:
            r = plan(*shape, base=base)
            cells = [r["weights_GB"], *(r[f"calibration_S{s}_GB"] for s in PLAN_SLICES)]
            cells += [r["selection_S1_GB"], r["selection_sliced_GB"], r["training_GB"]]
            lines.append(f"| {name} | {base} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--runs", default=",".join(RUNS), help="comma list of mode:slices")
    p.add_argument("--plan", action="store_true", help="print the planning table only")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plan:
        print(planning_table())
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(args.child, args.device, args.examples, out)))
        return 0
    import torch

    for run in args.runs.split(","):
        mode, _, slices = run.partition(":")
        if mode not in MODES or not slices.isdigit() or int(slices) < 1:
            print(f"--runs: {run!r} is not mode:slices (mode one of {', '.join(MODES)}, slices >= 1)", file=sys.stderr)
            return 2
        cmd = [sys.executable, __file__, "--child", run, "--device", args.device, "--examples", str(args.examples)]
        res = subprocess.run(
            [*cmd, "--out", str(out)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        (out / f"row-{mode}-s{slices}.json").write_text(res.stdout.strip().splitlines()[-1])
    if not (out / "selection-fp32-s1.pt").exists():
        print(f"no fp32 one-pass selection in {out} to compare with: add fp32:1 to --runs", file=sys.stderr)
        return 1
    ref = torch.load(out / "selection-fp32-s1.pt")
    k = sum(i.numel() for i in ref.values())
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("row-*.json"))]
    one_pass = next(r for r in rows if r["run"] == "fp32:1")
    for row in rows:
        sel = torch.load(out / f"selection-{row['mode']}-s{row['slices']}.pt")
        common = sum(int(torch.isin(sel[n].long(), ref[n].long()).sum()) for n in sel if n in ref)
        row["overlap_with_fp32"] = common / k
        row["identical_to_fp32"] = list(sel) == list(ref) and all(torch.equal(sel[n], ref[n]) for n in ref)
        row["accumulator_vs_one_pass"] = row["accumulator_mib"] / one_pass["accumulator_mib"]
        print(
            f"{row['run']:<7} {row['passes']} passes, {row['seconds']:6.1f} s; peak extra "
            f"{row['peak_extra_mib']:7.1f} MiB; mean gradients + candidates {row['accumulator_mib']:6.1f} MiB "
            f"({row['accumulator_vs_one_pass']:.3f}x one pass); selection "
            f"{'identical to' if row['identical_to_fp32'] else 'overlaps'} fp32:1 "
            f"({100 * row['overlap_with_fp32']:.2f}%)",
            flush=True,
        )
    planning = {f"{name} {base}": plan(*shape, base=base) for name, shape in PLAN_SHAPES.items() for base in BASE_BYTES}
    (out / "calibration.json").write_text(json.dumps({"device": args.device, "rows": rows, "plan": planning}, indent=1))
    print(planning_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
