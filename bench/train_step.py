"""One training step of every fine-tuning method, side by side, each in its own process.

    python bench/train_step.py                                  # CPU: SmolLM2-135M fp32, batch 8 x 128 (make bench)
    python bench/train_step.py --shape 1.1b --device cuda       # GPU: random-weight LLaMA shapes in bf16
    python bench/train_step.py --shape 8b --device cuda --gradient-checkpointing

Methods: ``full`` (torch AdamW over every parameter, fused on CUDA), ``lora`` (peft, rank 16, every linear layer),
``gallop-1%`` and ``gallop-0.1%`` (SparseAdamW, the fused step) and ``gallop-1%-torch-adamw`` (the same deltas
stepped by torch's AdamW, to show what the fused step buys). Each method runs in a fresh child process: the median
step time after warm-up, tokens per second, and the peak memory (the process's RSS high-water mark after setup on
the CPU, ``max_memory_allocated`` on CUDA). ``--repeats N`` runs every method N times, interleaved so that a slow
spell of a shared machine hits every method alike, and reports the medians. Writes ``train_step.json`` and
``train_step.png`` to ``--out``; ratios against LoRA and full fine-tuning are the figures that carry over between
machines. ``--methods qlora,qgallop-1%`` runs the quantized pair over the same model quantized to nf4
(bitsandbytes, compute dtype the model's): QLoRA (peft LoRA r16 on every linear layer) against QGaLLoP 1%, same
batch; their ratios are reported against ``qlora``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("full", "lora", "gallop-1%", "gallop-0.1%", "gallop-1%-torch-adamw")
QUANTIZED_METHODS = ("qlora", "qgallop-1%")  # over an nf4 base (bitsandbytes): --methods qlora,qgallop-1%
SHAPES = {  # LLaMA-architecture shapes (random weights) and their batch; "tiny" is the smoke test's
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        batch=2,
        seq=16,
    ),
    "1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        batch=8,
        seq=1024,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        batch=2,
        seq=1024,
    ),
}


def _build(shape: str, device: str, dtype, quantization: str | None = None):
    import torch

    if shape == "smollm2":
        from gallop.models import load_model

        model, _ = load_model("smollm2", dtype="fp32", device=device, quantization=quantization)
        return model, 8, 128
    import transformers as tf

    cfg = dict(SHAPES[shape])
    batch, seq = cfg.pop("batch"), cfg.pop("seq")
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg, max_position_embeddings=seq, tie_word_embeddings=False))
    if quantization is not None:
        from gallop.models import quantized_copy
        from gallop.quantized import bnb_config

        return quantized_copy(model.to(dtype), bnb_config(quantization, dtype), device), batch, seq
    return model.to(dtype), batch, seq


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _status_mib(key: str) -> float:
    """A ``/proc/self/status`` figure (``VmHWM``, ``VmRSS``) in MiB, NaN where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mib("VmHWM")


def _current_mib(device) -> float:
    """Memory held right after setup (model, method state, libraries): the part of the peak the step does not add."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mib("VmRSS")


def child(args) -> dict:
    """Set up one method, time its steps, report (runs in its own process)."""
    import torch

    import gallop
    from gallop import GallopConfig, SparseAdamW, SparseModel

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.shape != "smollm2" else torch.float32
    method = args.method
    model, batch, seq = _build(args.shape, args.device, dtype, "nf4" if method in QUANTIZED_METHODS else None)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if method == "full":
        params = [p for p in model.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        run = model
        trainable = sum(p.numel() for p in params)
    elif method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        run = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
        params = [p for p in run.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        trainable = sum(p.numel() for p in params)
    else:
        density = 0.01 if "1%" in method and "0.1%" not in method else 0.001
        config = GallopConfig(density=density, scorer="random")  # the step's cost does not depend on the scorer
        selection = gallop.select(model, None, config)
        run = SparseModel(model, selection)
        trainable = run.num_selected
        opt = (
            torch.optim.AdamW(run.parameters(), lr=1e-4, fused=device.type == "cuda")
            if method.endswith("torch-adamw")
            else SparseAdamW(run, lr=1e-4)
        )
    run.train()
    setup_mib = _current_mib(device)

    def step():
        loss = run(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _peak_reset(device)
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            step()
        Path(args.profile).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    ms = statistics.median(times) * 1e3
    return {
        "method": method,
        "ms_per_step": ms,
        "tokens_per_s": batch * seq / (ms / 1e3),
        "peak_mib": _peak_mib(device),
        "setup_mib": setup_mib,
        "trainable": trainable,
        "batch": batch,
        "seq": seq,
        "steps": args.steps,
    }


def _run_child(args, method: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--method",
        method,
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return {"method": method, "error": res.stderr.strip().splitlines()[-1][:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _combine(rounds: list[dict]) -> dict:
    """One method's figures over the repeats: the median step time and peak, each repeat's kept beside them."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[0]
    row = dict(ok[0])
    row["ms_per_step"] = statistics.median(r["ms_per_step"] for r in ok)
    row["tokens_per_s"] = row["batch"] * row["seq"] / (row["ms_per_step"] / 1e3)
    row["peak_mib"] = statistics.median(r["peak_mib"] for r in ok)
    row["setup_mib"] = statistics.median(r["setup_mib"] for r in ok)
    row["repeats_ms_per_step"] = [r["ms_per_step"] for r in ok]
    return row


def parent(args, out: Path | None = None) -> dict:
    """Every method in its own process; with ``out``, ``train_step.json`` is rewritten after each one (marked
    ``partial``), so a run cut short keeps the methods it finished."""
    import torch

    methods = args.methods.split(",")
    results = {"shape": args.shape, "device": args.device, "torch": torch.__version__, "repeats": args.repeats}
    rounds: dict[str, list[dict]] = {m: [] for m in methods}
    # methods interleaved within each repeat, so a slow spell of a shared machine hits every method alike
    for repeat in range(args.repeats):
        for method in methods:
            row = _run_child(args, method)
            rounds[method].append(row)
            if out is not None:
                done = [_combine(rounds[m]) for m in methods if rounds[m]]
                (out / "train_step.json").write_text(
                    json.dumps({**results, "partial": True, "methods": done}, indent=1)
                )
            if "error" not in row:
                print(
                    f"[{repeat + 1}/{args.repeats}] {method:<24} {row['ms_per_step']:9.1f} ms/step "
                    f"{row['tokens_per_s']:9.0f} tokens/s {row['peak_mib']:9.0f} MiB peak "
                    f"({row['setup_mib']:5.0f} after setup) {row['trainable']:>13,} trainable",
                    flush=True,
                )
    results["methods"] = [_combine(rounds[m]) for m in methods]
    by = {r["method"]: r for r in results["methods"] if "error" not in r}
    for r in results["methods"]:
        if "error" in r:
            continue
        for ref in ("lora", "full", "qlora"):
            if ref in by:
                r[f"speed_vs_{ref}"] = r["tokens_per_s"] / by[ref]["tokens_per_s"]
                r[f"memory_vs_{ref}"] = r["peak_mib"] / by[ref]["peak_mib"]
    print(f"median over {args.repeats} repeat(s):")
    for r in results["methods"]:
        if "error" in r:
            print(f"{r['method']:<24} error: {r['error']}")
            continue
        ratios = " ".join(
            f"{r[f'speed_vs_{ref}']:5.2f}x {ref} speed, {r[f'memory_vs_{ref}']:5.2f}x {ref} memory;"
            for ref in ("lora", "full", "qlora")
            if f"speed_vs_{ref}" in r
        )
        print(f"{r['method']:<24} {r['ms_per_step']:9.1f} ms/step {r['tokens_per_s']:7.0f} tokens/s {ratios}")
    return results


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results["methods"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["method"] for r in rows]
    colors = ["tab:red" if "gallop" in n else "tab:blue" for n in names]
    axes[0].bar(names, [r["tokens_per_s"] for r in rows], color=colors)
    axes[0].set_ylabel("tokens / s (higher is better)")
    axes[1].bar(names, [r["peak_mib"] for r in rows], color=colors)
    axes[1].set_ylabel("peak memory, MiB (lower is better)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=35, labelsize=7)
    fig.suptitle(f"one training step, {results['shape']} on {results['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="smollm2", choices=["smollm2", *SHAPES])
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="run every method this many times, interleaved")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = parent(args, out)
    (out / "train_step.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "train_step.png")
    return 0 if all("error" not in r for r in results["methods"]) else 1


if __name__ == "__main__":
    sys.exit(main())
