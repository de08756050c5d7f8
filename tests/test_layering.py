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


LIBRARY_COMMANDS = ("cmd_select", "cmd_eval", "cmd_merge", "cmd_export")


def _demo_imports(node: ast.AST) -> list[str]:
    """The gallop.demo modules that the import statements under ``node`` name (``from .demo...`` in gallop/cli.py,
    ``gallop.demo...`` anywhere)."""
    found = []
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom):
            module = n.module or ""
            if (n.level == 1 and module.split(".")[0] == "demo") or (n.level == 0 and module.startswith("gallop.demo")):
                found.append(module)
            elif n.level == 1 and not module and any(a.name == "demo" for a in n.names):
                found.append("demo")
        elif isinstance(n, ast.Import):
            found += [a.name for a in n.names if a.name.startswith("gallop.demo")]
    return found


def test_library_cli_commands_import_no_demo_module():
    """``gallop select``, ``eval``, ``merge`` and ``export``, every function of gallop/cli.py they call (directly or
    through one another) and the module's top level import nothing from gallop.demo (the modules they import are
    held to that by test_library_does_not_import_the_demo)."""
    tree = ast.parse((ROOT / "gallop" / "cli.py").read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not [m for n in top_level for m in _demo_imports(n)], "gallop/cli.py imports the demo at module level"
    seen: set[str] = set()
    todo = list(LIBRARY_COMMANDS)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert not _demo_imports(functions[name]), f"{name} imports {_demo_imports(functions[name])}"
        todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions]
    assert {"cmd_select", "cmd_eval", "parse_arguments", "_check_adapter"} <= seen


def test_the_demo_import_check_sees_every_spelling():
    """The check above would see each way gallop/cli.py could import the demo."""
    for source in (
        "from .demo.tasks import TASKS",
        "from .demo import tasks",
        "from . import demo",
        "from gallop.demo.finetune import DataArguments",
        "import gallop.demo.evaluate",
    ):
        assert _demo_imports(ast.parse(source)), source
    assert not _demo_imports(ast.parse("from .data import DataArguments\nfrom .tasks import TASKS"))
