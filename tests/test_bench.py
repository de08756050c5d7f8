"""The GPU benchmark script runs end to end on the CPU (small sizes, reference backend), so it cannot rot."""

import json

import pytest

from bench import kernels
from bench.shapes import llama8b_shapes


@pytest.mark.slow
def test_bench_kernels_quick_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("GALLOP_BACKEND", "reference")
    assert kernels.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert len(res["sizes"]) == 2 and res["sizes"][0]["select_topk"]["same_set_as_torch"]
    assert (tmp_path / "kernels.png").stat().st_size > 1000


def test_llama8b_shapes():
    shapes = llama8b_shapes()
    assert len(shapes) == 226
    assert sum(a * b for a, b in shapes) == 8_029_995_008  # 2 x 128256 x 4096 + 32 x 218,103,808


@pytest.mark.slow
def test_train_step_bench_runs_every_method(tmp_path):
    from bench import train_step

    assert train_step.main(["--shape", "tiny", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "train_step.json").read_text())
    rows = {r["method"]: r for r in res["methods"]}
    assert set(rows) == set(train_step.METHODS)
    assert rows["gallop-1%"]["trainable"] > rows["gallop-0.1%"]["trainable"] > 0
    assert rows["lora"]["speed_vs_full"] > 0 and (tmp_path / "train_step.png").stat().st_size > 1000


def test_weight_grad_bench_agrees(tmp_path):
    from bench import weight_grad

    assert weight_grad.main(["--quick", "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "weight_grad.json").read_text())["rows"]
    assert len(rows) == 2 * len(weight_grad.DENSITIES) and all(r["agree"] for r in rows)
