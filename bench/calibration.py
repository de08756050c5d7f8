"""Low-memory calibration: peak memory of each ``mean_gradients`` accumulator mode, and how much of the fp32
selection each one keeps.

    python bench/calibration.py                 # CPU: SmolLM2-135M (make bench)
    python bench/calibration.py --device cuda

Each mode runs in its own process (peak = VmHWM on the CPU, max_memory_allocated on CUDA, both after the model is
loaded, so the figure is weights + accumulators + one layer's gradient + activations). The selections at 1% are
compared with the fp32 one. Writes ``calibration.json`` with the measured peaks next to the planning formula's.
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
BYTES_PER_ELIGIBLE = {"fp32": 4.0, "bf16": 2.0, "cpu": 0.0}  # accumulator bytes on the device, per eligible weight


def child(mode: str, device: str, examples: int, out: Path) -> dict:
    import torch

    from gallop import GallopConfig, eligible_parameters, mean_gradients, select
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
    config = GallopConfig(density=0.01)
    grads = mean_gradients(model, data, config, accumulate=mode, progress=False)
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _hwm()) - base
    sel = select(model, grads, config)
    torch.save({n: i.cpu() for n, i in sel.items()}, out / f"selection-{mode}.pt")
    return {
        "mode": mode,
        "peak_extra_mib": peak / 2**20,
        "weights_mib": weights_bytes / 2**20,
        "eligible": eligible,
        "largest_tensor_mib": largest / 2**20,
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


def plan(n_params: float, n_eligible: float, largest: float, density: float = 0.01) -> dict:
    """Peak bytes of each phase for a bf16 model (activations excluded: they depend on batch and checkpointing)."""
    k = density * n_eligible
    weights = 2 * n_params
    return {
        "weights_GB": weights / 1e9,
        **{f"calibration_{m}_GB": (weights + BYTES_PER_ELIGIBLE[m] * n_eligible + 2 * largest) / 1e9 for m in MODES},
        # Triton selection: output 4 B/k, the bit mask n/8, per-block arrays 12 B per 2048 elements, candidates
        # 1.25 x 8% of k x 12 B (<= 12 B x 32M; freed before the outputs)
        "selection_GB": (weights + 4 * k + n_eligible / 8 + 12 * n_eligible / 2048) / 1e9
        + 12 * min(2**25, 1.25 * 0.08 * k) / 1e9,
        # training: fp32 delta, base, grad, two moments, the gradients' flat copy (24 B) + int32 index (4 B) per k,
        # and one layer's dense weight gradient inside weight_grad_at
        "training_GB": (weights + 28 * k + 2 * largest) / 1e9,
    }


PLAN_SHAPES = {  # parameters, eligible (linear layers without the head), largest eligible tensor (elements)
    "1.1B (TinyLlama)": (1.10e9, 0.968e9, 5632 * 2048),
    "8B (LLaMA3)": (8.03e9, 6.98e9, 14336 * 4096),
    "70B (LLaMA3)": (70.6e9, 68.5e9, 28672 * 8192),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(args.child, args.device, args.examples, out)))
        return 0
    import torch

    rows = []
    for mode in MODES:
        res = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--device",
                args.device,
                "--examples",
                str(args.examples),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    ref = torch.load(out / "selection-fp32.pt")
    k = sum(i.numel() for i in ref.values())
    for row in rows:
        sel = torch.load(out / f"selection-{row['mode']}.pt")
        common = sum(int(torch.isin(sel[n].long(), ref[n].long()).sum()) for n in sel if n in ref)
        row["overlap_with_fp32"] = common / k
        print(
            f"{row['mode']:<5} peak extra {row['peak_extra_mib']:8.1f} MiB ({row['bytes_per_eligible_measured']:.2f} "
            f"bytes per eligible weight; accumulators by the formula {row['accumulator_mib_formula']:.1f} MiB), "
            f"selection overlap with fp32 {100 * row['overlap_with_fp32']:.2f}%",
            flush=True,
        )
    planning = {name: plan(*shape) for name, shape in PLAN_SHAPES.items()}
    (out / "calibration.json").write_text(
        json.dumps({"device": args.device, "modes": rows, "plan": planning}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
