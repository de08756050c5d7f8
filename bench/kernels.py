"""Benchmark every gallop kernel against its torch baseline, timed in the same run.

    PYTHONPATH=. python bench/kernels.py --out runs/bench              # on the GPU (what `make gpu-check` runs)
    PYTHONPATH=. python bench/kernels.py --device cpu --quick --out runs/bench-cpu   # smoke run (reference backend)

For each kernel it prints the time, the torch baseline's time, the speed-up, the achieved GB/s and the fraction of
the copy bandwidth measured in the same run; it writes ``kernels.json`` and ``kernels.png`` (time vs size) to
``--out``. Workloads follow ../shared/baselines/README.md.

Ops are called as training calls them: ``check_indices=False`` and ``nonfinite="assume_finite"`` (the checked
calls are rows of their own, ``checked_ms``), and each time is the median over rounds of the mean of many
back-to-back calls between one pair of CUDA events (as ``triton.testing.do_bench``), so launch latency overlaps
as it does in a training loop. The selection's bandwidth counts the bytes it really reads: three passes over
(grad, weight) (histogram, collect, compact; only heavy ties take the two-pass fallback, which random data does
not).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gallop_kernels as gk  # noqa: E402
from bench.shapes import llama8b_inputs, llama8b_shapes, peak_extra_memory  # noqa: E402
from gallop_kernels.sparse_adamw import reference  # noqa: E402

CALLS = 20  # back-to-back calls per timing round of the ops a training step calls every step


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps: int = 10, warmup: int = 2, calls: int = 1) -> float:
        """Milliseconds per ``fn()``: the median over ``reps`` rounds of ``calls`` back-to-back calls each."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                for _ in range(calls):
                    fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / calls)
            else:
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - t) * 1e3 / calls)
        times.sort()
        return times[len(times) // 2]


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sorted_random_indices(n: int, k: int, device, gen) -> torch.Tensor:
    # k distinct sorted indices without an n-sized permutation: stratified sampling, one per stride
    stride = n // k
    return (
        torch.arange(k, device=device, dtype=torch.int64) * stride
        + torch.randint(0, stride, (k,), device=device, generator=gen)
    ).to(torch.int32 if n < 2**31 else torch.int64)


def bench_copy(timer, n, device):
    x = torch.empty(n, device=device)
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x))
    return {"ms": ms, "GBps": 8 * n / ms / 1e6}


def bench_select(timer, n, device, gen, copy_gbps):
    g = torch.randn(n, device=device, generator=gen)
    w = (torch.randn(n, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    k = max(1, n // 100)
    ours = timer(lambda: gk.select_topk([g], [w], k), reps=5)

    def torch_path():
        return torch.topk(g.abs() / (w.float().abs() + 1e-8), k, sorted=False).indices

    base = timer(torch_path, reps=3, warmup=1)
    got = torch.sort(gk.select_topk([g], [w], k)[0].long()).values
    want = torch.sort(torch_path()).values
    agree = bool(torch.equal(got, want))  # continuous random data: no ties at the threshold
    gbps = 3 * 6 * n / ours / 1e6  # three reads of (fp32 g, bf16 w): histogram, collect, compact
    return {
        "ms": ours,
        "torch_ms": base,
        "speedup": base / ours,
        "GBps_3reads": gbps,
        "copy_fraction": gbps / copy_gbps,
        "same_set_as_torch": agree,
        "k": k,
    }


def bench_adamw(timer, k, device, gen, copy_gbps):
    p, g = torch.randn(k, device=device, generator=gen), torch.randn(k, device=device, generator=gen)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ours = timer(lambda: gk.sparse_adamw_(p, g, m, v, step=3, lr=1e-4, weight_decay=0.01), calls=CALLS)
    param = torch.nn.Parameter(p.clone())
    param.grad = g.clone()
    opt = torch.optim.AdamW([param], lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    base = timer(opt.step, calls=CALLS)
    gbps = 28 * k / ours / 1e6  # read p, g, m, v; write p, m, v
    return {
        "ms": ours,
        "torch_fused_adamw_ms": base,
        "speedup": base / ours,
        "GBps": gbps,
        "copy_fraction": gbps / copy_gbps,
        "k": k,
    }


def bench_fused_step(timer, n, device, gen, copy_gbps):
    k = max(1, n // 100)
    w = (torch.randn(n, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    wg = (torch.randn(n, device=device, generator=gen) * 1e-3).to(torch.bfloat16)
    idx = _sorted_random_indices(n, k, device, gen)
    base_vals = w.view(-1)[idx.long()].clone()
    delta, m, v = (torch.zeros(k, device=device) for _ in range(3))
    ours = timer(
        lambda: gk.sparse_adamw_step_(
            w, wg, idx, base_vals, delta, m, v, step=3, lr=1e-4, check_indices=False, nonfinite="assume_finite"
        ),
        calls=CALLS,
    )
    checked = timer(lambda: gk.sparse_adamw_step_(w, wg, idx, base_vals, delta, m, v, step=3, lr=1e-4))
    il = idx.long()

    def torch_path():  # what a user writes with torch index ops
        grad = wg.view(-1)[il].float()
        reference.sparse_adamw_(delta, grad, m, v, step=3, lr=1e-4)
        w.view(-1)[il] = (base_vals.float() + delta).to(torch.bfloat16)

    base = timer(torch_path, calls=CALLS)
    moved = k * (2 + 4 + 12 + 12 + 2 + 2 + 4)  # grad gather, idx, d/m/v read+write, base, weight write
    return {
        "ms": ours,
        "checked_ms": checked,
        "torch_ms": base,
        "speedup": base / ours,
        "GBps": moved / ours / 1e6,
        "copy_fraction": moved / ours / 1e6 / copy_gbps,
        "k": k,
    }


def bench_scatter(timer, n, device, gen, copy_gbps):
    k = max(1, n // 100)
    w = (torch.randn(n, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    idx = _sorted_random_indices(n, k, device, gen)
    base_vals = w.view(-1)[idx.long()].clone()
    delta = torch.randn(k, device=device, generator=gen) * 1e-3
    ours = timer(
        lambda: gk.scatter_(w, idx, delta, base=base_vals, check_indices=False, nonfinite="assume_finite"), calls=CALLS
    )
    checked = timer(lambda: gk.scatter_(w, idx, delta, base=base_vals))
    il = idx.long()
    d16 = delta.to(torch.bfloat16)
    base = timer(lambda: w.view(-1).index_add_(0, il, d16), calls=CALLS)
    moved = k * (4 + 2 + 4 + 2)
    return {
        "ms": ours,
        "checked_ms": checked,
        "torch_index_add_ms": base,
        "speedup": base / ours,
        "GBps": moved / ours / 1e6,
        "copy_fraction": moved / ours / 1e6 / copy_gbps,
        "k": k,
    }


GROUP_TENSORS = len(llama8b_shapes())  # the write-back's tensor count at LLaMA3-8B (226)


def bench_scatter_grouped(timer, n, device, gen, copy_gbps):
    """The write-back after a step: ``n`` elements in ``GROUP_TENSORS`` bf16 weights, k = 1% with fp32 bases (as
    SparseModel keeps them), one ``scatter_grouped_`` against torch's per-tensor ``index_put_`` loop and the
    per-tensor ``scatter_`` loop (the write-back before it)."""
    size = max(100, n // GROUP_TENSORS)
    ws = [(torch.randn(size, device=device, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(GROUP_TENSORS)]
    idx = [_sorted_random_indices(size, size // 100, device, gen) for _ in ws]
    bases = [w[i.long()].float() for w, i in zip(ws, idx)]
    deltas = [torch.randn(i.numel(), device=device, generator=gen) * 1e-3 for i in idx]
    kw = dict(check_indices=False, nonfinite="assume_finite")
    ours = timer(lambda: gk.scatter_grouped_(ws, idx, deltas, bases=bases, **kw), calls=CALLS)
    loop = timer(lambda: [gk.scatter_(w, i, d, base=b, **kw) for w, i, d, b in zip(ws, idx, deltas, bases)])
    il = [i.long() for i in idx]

    def torch_path():  # what a user writes with torch index ops: one index_put_ per weight
        for w, i, d, b in zip(ws, il, deltas, bases):
            w.index_put_((i,), (b + d).to(torch.bfloat16))

    base = timer(torch_path)
    k = sum(i.numel() for i in idx)
    moved = k * (4 + 4 + 4 + 2)  # idx, delta, base, the weight's entry
    return {
        "ms": ours,
        "per_tensor_scatter_ms": loop,
        "torch_index_put_loop_ms": base,
        "speedup": base / ours,
        "GBps": moved / ours / 1e6,
        "copy_fraction": moved / ours / 1e6 / copy_gbps,
        "k": k,
        "tensors": GROUP_TENSORS,
    }


def bench_llama8b(timer, device, gen):
    grads, weights = llama8b_inputs(device, gen)
    total = sum(w.numel() for w in weights)
    k = total // 100
    out, extra = peak_extra_memory(lambda: gk.select_topk(grads, weights, k))
    out_bytes = sum(o.numel() * o.element_size() for o in out)
    assert sum(o.numel() for o in out) == k
    ms = timer(lambda: gk.select_topk(grads, weights, k), reps=3, warmup=1)
    return {
        "ms": ms,
        "tensors": len(llama8b_shapes()),
        "elements": total,
        "k": k,
        "peak_extra_GiB": extra / 2**30,
        "peak_extra_without_output_GiB": (extra - out_bytes) / 2**30,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        ("select_topk", "torch_ms", "score + torch.topk"),
        ("fused_step", "torch_ms", "torch index ops"),
        ("scatter", "torch_index_add_ms", "index_add_"),
    ]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6))
    for ax, (name, base_key, base_label) in zip(axes, names):
        rows = results["sizes"]
        xs = [r["n"] for r in rows if name in r]
        ax.loglog(xs, [r[name]["ms"] for r in rows if name in r], "o-", label="gallop")
        ax.loglog(xs, [r[name][base_key] for r in rows if name in r], "s--", label=base_label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("elements (N)")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['device_name']}  (k = 1% of N)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    ap.add_argument("--skip-llama8b", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick for a smoke run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = [1 << 16, 1 << 18] if args.quick else [1 << 24, 1 << 26, 1 << 28, 1 << 30]
    results = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "backend": gk.backend(device),
        "sizes": [],
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except Exception:
        results["triton"] = None
    copy = bench_copy(timer, sizes[-1], device)
    results["copy"] = copy
    print(
        f"{results['device_name']}  torch {torch.__version__}  triton {results['triton']}  "
        f"backend {results['backend']}  copy {copy['GBps']:.0f} GB/s",
        flush=True,
    )
    for n in sizes:
        row = {"n": n}
        benches = [("select_topk", bench_select), ("fused_step", bench_fused_step), ("scatter", bench_scatter)]
        for name, fn in benches + [("scatter_grouped", bench_scatter_grouped)]:
            row[name] = fn(timer, n, device, gen, copy["GBps"])
            _free(device)
            r = row[name]
            base = next(v for key, v in r.items() if key.startswith("torch") and key.endswith("ms"))
            print(
                f"N=2^{n.bit_length() - 1:<3} {name:<12} {r['ms']:9.3f} ms   torch {base:9.3f} ms   "
                f"x{r['speedup']:6.2f}   {100 * r['copy_fraction']:5.1f}% of copy bandwidth",
                flush=True,
            )
        results["sizes"].append(row)
        (out / "kernels.json").write_text(json.dumps(results, indent=1))  # a run cut short keeps what it measured
    k_adamw = 10**7 if not args.quick else 10**5
    results["sparse_adamw"] = r = bench_adamw(timer, k_adamw, device, gen, copy["GBps"])
    print(
        f"sparse_adamw_ k={k_adamw:.0e}: {r['ms']:.3f} ms, {r['GBps']:.0f} GB/s = {100 * r['copy_fraction']:.1f}% of "
        f"copy (torch fused AdamW on the same flat buffer: {r['torch_fused_adamw_ms']:.3f} ms)",
        flush=True,
    )
    (out / "kernels.json").write_text(json.dumps(results, indent=1))
    if device.type == "cuda" and not args.quick and not args.skip_llama8b:
        _free(device)
        results["llama8b"] = r = bench_llama8b(timer, device, gen)
        print(
            f"select_topk LLaMA3-8B shapes ({r['tensors']} tensors, {r['elements']:.3g} elements, k=1%): "
            f"{r['ms']:.1f} ms, peak extra {r['peak_extra_GiB']:.2f} GiB "
            f"({r['peak_extra_without_output_GiB']:.2f} GiB beyond the output)",
            flush=True,
        )
    (out / "kernels.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "kernels.png")
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
