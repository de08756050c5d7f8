"""Is a sampled weight gradient ever faster than the dense GEMM plus a gather? (``weight_grad_at``'s two paths.)

    python bench/weight_grad.py                       # CPU (make bench), fp32
    python bench/weight_grad.py --device cuda         # GPU, bf16

For each layer shape ``[M, N]``, token count ``T`` and density it times

* ``dense``: ``(dy^T @ x).view(-1)[idx]`` (what ``gallop_kernels.weight_grad_at`` runs), and
* ``sampled``: only the selected entries, ``out[i] = sum_t dy[t, r_i] * x[t, c_i]``, as a sampled dense-dense
  product (``weight_grad_at(path="sampled")``, ``torch.sparse.sampled_addmm`` on the selection's CSR pattern; each
  entry costs ``T`` multiply-adds, so it does ``K * T`` of them against the GEMM's ``M * N * T``),

checks that they agree, and writes ``weight_grad.json`` with the speed-up of ``sampled`` over ``dense``: the
crossover table of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gallop_kernels as gk  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (5632, 2048)]
DENSITIES = [0.5, 0.25, 0.1, 0.01, 0.001, 0.0001]


def _time(fn, device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="two small shapes (the smoke test)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES[:2] if args.quick else SHAPES
    tokens = 64 if args.quick else args.tokens
    rows = []
    for m, n in shapes:
        dy = torch.randn(tokens, m, generator=gen).to(dtype).to(device)
        x = torch.randn(tokens, n, generator=gen).to(dtype).to(device)
        for density in DENSITIES:
            k = max(1, int(density * m * n))
            idx = torch.sort(torch.randperm(m * n, generator=gen)[:k]).values.to(device)
            want = gk.weight_grad_at(dy, x, idx, path="dense")
            got = gk.weight_grad_at(dy, x, idx, path="sampled")
            scale = float(want.abs().max()) + 1e-30
            agree = bool(((got - want).abs() <= 4 * torch.finfo(dtype).eps * scale * tokens**0.5).all())
            t_dense = _time(
                lambda a=(dy, x, idx): gk.weight_grad_at(*a, check_indices=False, path="dense"), device, args.reps
            )
            t_sampled = _time(
                lambda a=(dy, x, idx): gk.weight_grad_at(*a, check_indices=False, path="sampled"), device, args.reps
            )
            row = {
                "M": m,
                "N": n,
                "tokens": tokens,
                "density": density,
                "k": k,
                "dense_ms": t_dense,
                "sampled_ms": t_sampled,
                "sampled_speedup": t_dense / t_sampled,
                "agree": agree,
            }
            rows.append(row)
            print(
                f"[{m:>5} x {n:>5}] T={tokens} density {density:>7.4%}: dense {t_dense:8.3f} ms, sampled "
                f"{t_sampled:8.3f} ms, sampled/dense speed-up {t_dense / t_sampled:6.2f}x",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weight_grad.json").write_text(
        json.dumps({"device": args.device, "dtype": str(dtype), "rows": rows}, indent=1)
    )
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
