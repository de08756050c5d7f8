"""Every Triton kernel compiles ahead of time to cubin for Hopper (sm_90: H100/H200) and Ampere (sm_80: A100).

The interpreter tests check the kernels' results on the CPU; this checks that the same source also lowers through
Triton's real compiler (loop-carried types, atomics, histogram, casts, bitcasts), so a GPU session does not meet a
compile error first. It needs only the triton wheel (which ships ptxas), no GPU. The matrix lives in
``bench/kernel_matrix.py`` and runs in a subprocess, because this test process interprets the kernels.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    script = Path(__file__).resolve().parents[2] / "bench" / "kernel_matrix.py"
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "sm90 (H100/H200):" in res.stdout and "sm80 (A100):" in res.stdout
