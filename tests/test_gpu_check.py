"""The device run's harness (bench/gpu_check.py) without a device: its budget, its steps' files, and that nothing
it imports is missing on the device machine. `make gpu-rehearsal` (CI) runs the whole sequence on the CPU."""

import ast
import json
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
DEVICE_LACKS = {"trl", "datasets", "gguf"}  # the H200 machine: no network, no pip index, none of these


def test_the_budgets_fit_one_device_command_with_room_for_a_rerun():
    assert sum(s.budget_s for s in gpu_check.STEPS) <= gpu_check.TOTAL_S <= 6 * 60
    assert [s.name for s in gpu_check.STEPS] == ["tests", "kernels", "train_1.1b", "weight_grad", "train_8b"]
    assert all(s.outputs for s in gpu_check.STEPS)  # every step names the file that proves it ran


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:  # module level only: imports inside functions run only on the paths that need them
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_the_device_run_imports_is_missing_there():
    files = [*ROOT.glob("gallop/**/*.py"), *ROOT.glob("gallop_kernels/**/*.py"), *ROOT.glob("bench/*.py")]
    files += [*ROOT.glob("tests/kernels/*.py"), ROOT / "tests/conftest.py", ROOT / "tests/models.py"]
    files += [ROOT / "tests/gallop" / n for n in ("conftest.py", "helpers.py", "test_sparse.py", "test_optim.py")]
    files = [f for f in files if "demo" not in f.parts]  # the demo (datasets, trl) is not part of the device run
    offenders = {str(f.relative_to(ROOT)): _module_level_imports(f) & DEVICE_LACKS for f in files}
    assert not {f: m for f, m in offenders.items() if m}


def test_a_step_that_overruns_is_killed_and_recorded(tmp_path, monkeypatch):
    sleep = "-c 'import time; time.sleep(30)'"
    slow = gpu_check.Step("slow", sleep, sleep, budget_s=1, rehearsal_budget_s=1, outputs=("never.json",))
    record = gpu_check.run_step(1, slow, tmp_path, rehearsal=True, deadline=float("inf"))
    assert record["timed_out"] and record["rc"] == 124 and record["missing_outputs"] == ["never.json"]
    assert json.loads((tmp_path / "01-slow" / "step.json").read_text())["timed_out"]
    assert "killed after" in (tmp_path / "01-slow.txt").read_text()


def test_an_overrun_kills_the_step_s_children_too(tmp_path):
    """The train-step bench runs one child process per method: a killed step must not leave one on the GPU."""
    import time

    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    spawn = f'-c "{code}"'
    step = gpu_check.Step("tree", spawn, spawn, budget_s=3, rehearsal_budget_s=3)
    record = gpu_check.run_step(1, step, tmp_path, rehearsal=True, deadline=float("inf"))
    assert record["timed_out"]
    pid = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; a zombie not yet reaped by init counts as gone
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the grandchild {pid} survived its step's timeout")


@pytest.mark.parametrize("bad", ["nosuch", "tests,nosuch"])
def test_unknown_steps_are_refused(bad, capsys, tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path / "out"), "--steps", bad])
    assert "--steps must name steps among" in capsys.readouterr().err and not (tmp_path / "out").exists()
