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
    grouped = res["sizes"][0]["scatter_grouped"]
    assert grouped["tensors"] == 226 and grouped["ms"] > 0 and grouped["torch_index_put_loop_ms"] > 0
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


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.U16 R8, desc[UR4][R6.64] ;
        /*0040*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0050*/                   FMUL R9, R4, R5 ;
        /*0060*/                   ATOMS.POPC.INC.32 RZ, [R9+URZ] ;
        /*0070*/              @!P0 BRA `(.L_x_1) ;
        /*0080*/                   RED.E.ADD.64.STRONG.GPU desc[UR4][R2.64], R4 ;
        /*0090*/                   EXIT ;
.L_x_2:
        /*00a0*/                   BRA `(.L_x_2);
"""


def test_roofline_reads_the_loop_body_and_the_widths():
    from bench.roofline import Sass, counts, global_bytes_per_lane

    sass = Sass.parse(SASS)
    assert len(sass.instructions) == 11 and sass.labels == {".L_x_1": 0x20, ".L_x_2": 0xA0}
    assert sass.loops() == [(0x20, 0x70)]  # the padding self-branch after EXIT is not a loop
    assert sass.main_body(persistent=False) == (sass.instructions, False, [(0x20, 0x70)])
    body, is_loop, inner = sass.main_body()
    assert is_loop and inner == [] and [i[1] for i in body] == ["LDG", "LDG", "IADD3", "FMUL", "ATOMS", "BRA"]
    c = counts(body)
    assert (c["global_load"], c["alu_int"], c["alu"], c["shared_atomic"], c["branch"]) == (2, 1, 1, 1, 1)
    weighted = counts(sass.instructions, [(0x20, 0x70)], trips=2.5)  # a data-dependent loop, 2.5 trips expected
    assert (weighted["global_load"], weighted["alu"], weighted["global_atomic"]) == (5.0, 2 + 2.5, 1)
    assert global_bytes_per_lane(body) == 16 + 2 and global_bytes_per_lane(sass.instructions) == 16 + 2 + 8


@pytest.mark.slow
def test_roofline_finds_the_adamw_stream_memory_bound():
    """The known case: AdamW reads p, g, m, v and writes p, m, v (28 bytes an entry) with a few dozen FLOPs, so
    its compiled code must put it on the memory bound, with the bytes counted from its SASS equal to 28."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = (
        "import json, bench.roofline as r\n"
        "from bench.kernel_matrix import adamw_variant\n"
        "c = r.analyse(*adamw_variant(), arch=90)\n"
        "p = r.Prediction('sparse_adamw_', '2^30', [r.Pass(c, 1e7, 28e7)], launches=1, syncs=0).compute()\n"
        "print(json.dumps({'bytes': c.global_bytes_per_element, 'bound': p.binding, 'bounds': p.bounds_ms}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bytes"] == 28.0 and out["bound"] == "memory", out


def test_train_step_writes_each_method_as_it_finishes(tmp_path, monkeypatch):
    """The device run cuts a step at its budget: the methods finished before the cut must be on disk."""
    from bench import train_step

    def one_method(args, method):
        if method == "lora":
            raise KeyboardInterrupt  # stands for the kill at the budget
        row = {"method": method, "ms_per_step": 10.0, "batch": 2, "seq": 16, "peak_mib": 1.0, "setup_mib": 1.0}
        return {**row, "tokens_per_s": 3200.0, "trainable": 7}

    monkeypatch.setattr(train_step, "_run_child", one_method)
    with pytest.raises(KeyboardInterrupt):
        train_step.main(["--shape", "tiny", "--methods", "gallop-1%,lora,full", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "train_step.json").read_text())
    assert saved["partial"] and [m["method"] for m in saved["methods"]] == ["gallop-1%"]
