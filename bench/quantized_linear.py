"""A selected nf4 layer's forward, two ways, on SmolLM2-135M's layer shapes (CPU): which one ``gallop.quantized``
uses.

* ``dequantize``: de-quantize into a temporary, write ``cast(base + delta)`` at the k indices, one dense GEMM
  (``quantized_sparse_linear``, what gallop does);
* ``quantized+sparse``: bitsandbytes' own ``Linear4bit`` forward plus ``x S^T`` with ``S`` the k deltas as a CSR
  matrix (``torch.sparse.mm``).

    python bench/quantized_linear.py            # prints the median ms of each, per shape, and the ratio
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"q_proj 576x576": (576, 576), "up_proj 1536x576": (1536, 576), "down_proj 576x1536": (576, 1536)}
TOKENS = 8 * 128  # bench/train_step.py's SmolLM2 batch
DENSITY = 0.01


def _median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _time_shape(out_f: int, in_f: int) -> tuple[float, float]:
    """(ms of the de-quantize path, ms of the quantized matmul + sparse product) for one layer shape."""
    import bitsandbytes as bnb
    import torch

    from gallop.quantized import dequantized, quantized_sparse_linear

    dense = torch.nn.Linear(in_f, out_f, bias=False)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    k = int(DENSITY * out_f * in_f)
    idx = torch.randperm(out_f * in_f)[:k].sort().values
    delta = torch.randn(k) * 1e-3
    base = dequantized(layer).reshape(-1)[idx].float()
    s = torch.sparse_coo_tensor(torch.stack([idx // in_f, idx % in_f]), delta, (out_f, in_f)).to_sparse_csr()
    x = torch.randn(TOKENS, in_f)
    with torch.no_grad():
        a = _median_ms(lambda: quantized_sparse_linear(x, layer, delta, idx, base))
        b = _median_ms(lambda: layer(x) + torch.sparse.mm(s, x.t()).t())
    return a, b


def main() -> int:
    import torch

    torch.manual_seed(0)
    print(f"{'shape':<20} {'dequantize':>11} {'quant+sparse':>13}  ratio (tokens {TOKENS}, density {DENSITY})")
    for name, (out_f, in_f) in SHAPES.items():
        a, b = _time_shape(out_f, in_f)
        print(f"{name:<20} {a:9.2f} ms {b:11.2f} ms  {b / a:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
