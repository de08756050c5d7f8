"""The architecture as tests: no import cycles, gallop_kernels never imports gallop or transformers, the library
never imports the demo (only the CLI does), and the test-time garbage fill of torch.empty is active."""

import ast
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gallop", "gallop_kernels")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ours that ``name`` imports (at module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rpartition(".")[0]
            if t in modules or t.split(".")[0] in ("transformers", "matplotlib"):
                found.add(t)
    found.discard(name)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [node])


def test_kernels_know_tensors_not_models():
    for name, deps in _graph().items():
        if name.startswith("gallop_kernels"):
            bad = {d for d in deps if d.split(".")[0] in ("gallop", "transformers", "matplotlib")}
            assert not bad, f"{name} imports {bad}"


def test_library_does_not_import_the_demo():
    for name, deps in _graph().items():
        if name.startswith("gallop") and not name.startswith(("gallop.demo", "gallop.cli", "gallop_kernels")):
            assert not {d for d in deps if d.startswith("gallop.demo")}, name
            assert not {d for d in deps if d.startswith("matplotlib")}, name


def test_uninitialized_library_allocations_are_garbage():
    from gallop_kernels.gather_scatter import reference  # any library module's globals will do

    allocate = eval("torch.empty(4)", {"__name__": reference.__name__, "torch": torch})
    assert bool(torch.isnan(allocate).all())
    assert not bool(torch.isnan(torch.empty(4).fill_(0)).any())


def test_library_cli_commands_import_no_demo_module():
    """``gallop merge`` and ``gallop export`` (and the helpers they call) import nothing from gallop.demo."""
    tree = ast.parse((ROOT / "gallop" / "cli.py").read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name in ("cmd_merge", "cmd_export", "_check_adapter", "parse_arguments"):
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("demo"), f"{name} imports gallop.demo.{node.module}"
                assert not (node.module or "").startswith("gallop.demo"), f"{name} imports {node.module}"
