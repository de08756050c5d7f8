"""Reference (CPU) selection vs torch.topk on one 1e8-element tensor at k = 1%, in the same run.

    make bench            # or: python -m pytest bench/bench_reference_select.py --benchmark-only

Times are medians of pytest-benchmark rounds; the peak extra memory of ``select_topk`` (beyond its inputs) is
measured in a fresh subprocess from its peak RSS (VmHWM, reset right before the call).
Set GALLOP_BENCH_N to change the size.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gallop_kernels as gk

N = int(os.environ.get("GALLOP_BENCH_N", 10**8))
K = N // 100


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(N, generator=gen)
    w = torch.randn(N, generator=gen).to(torch.bfloat16)
    return g, w


def _torch_topk(g, w):
    score = g.abs() / (w.float().abs() + 1e-8)
    return torch.topk(score, K).indices


def test_torch_score_topk(benchmark, data):
    benchmark.group = f"select 1% of {N:.0e}"
    benchmark.pedantic(_torch_topk, args=data, rounds=3, iterations=1, warmup_rounds=1)


def test_torch_topk_only(benchmark, data):
    """torch.topk alone on precomputed scores (the score tensor is not counted)."""
    benchmark.group = f"select 1% of {N:.0e}"
    g, w = data
    score = g.abs() / (w.float().abs() + 1e-8)
    benchmark.pedantic(lambda: torch.topk(score, K), rounds=3, iterations=1, warmup_rounds=1)


def test_gallop_reference_select(benchmark, data):
    benchmark.group = f"select 1% of {N:.0e}"
    g, w = data
    out = benchmark.pedantic(lambda: gk.select_topk([g], [w], K), rounds=5, iterations=1, warmup_rounds=1)
    assert out[0].numel() == K
    # the same set as torch (scores of continuous random data have no ties at the threshold)
    score = g.abs() / (w.float().abs() + 1e-8)
    chosen = torch.zeros(N, dtype=torch.bool)
    chosen[out[0].long()] = True
    assert float(score[chosen].min()) >= float(score[~chosen].max())


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import gallop_kernels as gk

    def status(field):  # kB values of /proc/self/status (this process image only; ru_maxrss would inherit the
        with open("/proc/self/status") as f:  # parent's peak across fork + exec)
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    n = int(sys.argv[1])
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, generator=gen)
    w = torch.empty(n, dtype=torch.bfloat16)
    for i in range(0, n, 1 << 20):  # no fp32 temporary of size n
        w[i:i + (1 << 20)] = torch.randn(min(1 << 20, n - i), generator=gen)
    gk.select_topk([g[:1000]], [w[:1000]], 10)  # warm up the allocator and lazy imports
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    out = gk.select_topk([g], [w], n // 100)
    peak = status("VmHWM:")
    print(json.dumps({"n": n, "extra_bytes": max(0, peak - before), "output_bytes": out[0].numel() * 4}))
""")


def test_reference_select_memory():
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(N)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GALLOP_BACKEND": "reference"},
    )
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    per_element = rec["extra_bytes"] / rec["n"]
    print(
        f"\npeak extra memory of select_topk on {rec['n']:.0e} elements: {rec['extra_bytes'] / 2**20:.1f} MiB "
        f"= {per_element:.3f} bytes/element (output indices: {rec['output_bytes'] / 2**20:.1f} MiB)"
    )
    assert per_element < 2.0
