"""farense/'s floor plan, from the code's own imports: no circles, nothing imported from a higher layer.

Every import counts: at module level, inside functions and under TYPE_CHECKING (a type is a
dependency too). The layers are the README's drawing ("How it is built"), lowest first; a module
may import its own layer and the layers below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "farense"

# Lowest first. The top-level modules below `run` are the shared vocabulary every package uses.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("farense", "farense.codes", "farense.errors", "farense.config", "farense.overfitting",
              "farense.console", "farense.signals", "farense.faults")),
    ("run", ("farense.run",)),
    ("model", ("farense.model",)),
    ("disk", ("farense.disk",)),
    ("train", ("farense.train",)),
    ("release", ("farense.release",)),
    ("observe", ("farense.observe",)),
    ("commands", ("farense.commands", "farense.cli", "farense.__main__")),
)
MAX_TOP_LEVEL_MODULES = 10
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported farense module, line, inside a function) for every import statement of the module."""
    tree = ast.parse(path.read_text())
    in_function = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(f)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno, id(node) in in_function))
    return found


def layer_of(module: str) -> int:
    best, index = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, index = len(p), i
    return index


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t, _, _ in imports_of(m, p, known)} for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_every_farense_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) < 0] == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    known = modules()
    upward = [f"{m} ({layer_of(m)}: {LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]}) at line {line}"
              for m, p in known.items() for t, line, _ in imports_of(m, p, known) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_project_modules_are_imported_at_module_level_only():
    """Inside a function only heavy third-party imports may hide (mlx, mlx-lm, numpy, prefect, matplotlib)."""
    known = modules()
    hidden = [f"{m}:{line} imports {t} inside a function" for m, p in known.items()
              for t, line, inner in imports_of(m, p, known) if inner]
    assert hidden == []


def test_each_package_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init.relative_to(ROOT)} does not say what it may import"


def test_the_farense_command_starts_no_thread_and_no_heavy_import_before_it_runs(tmp_path):
    """Building the parser imports every command module (and so most of farense): it must not import
    numpy or mlx, whose thread pools would start before `farense train` blocks preemption signals."""
    import subprocess
    import sys

    code = ("import os, sys, farense.cli; farense.cli.build_parser(); "
            "print(len(os.listdir('/proc/self/task')) if os.path.isdir('/proc/self/task') else 1, "
            "sorted(m for m in ('numpy', 'mlx', 'mlx_lm', 'prefect', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split(maxsplit=1) == ["1", "[]\n"], out


def test_few_modules_at_the_top_and_no_long_functions():
    top = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_no_demo_flag_beside_a_config_in_the_library_or_the_tasks():
    """The config records its overlays; nothing below the flows takes a `demo` argument next to it."""
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tasks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in [*node.args.args, *node.args.kwonlyargs]]
                if "demo" in names and any(n in names for n in ("config", "cfg")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert offenders == []


def test_run_state_json_is_written_from_one_module():
    writers = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "write_run_state(" in p.read_text()}
    assert writers == {"farense/run/runstate.py"}


@pytest.mark.parametrize("probe", [
    {"farense.run.layout": {"farense.train.loop"}},  # an upward import
    {"farense.codes": {"farense.errors"}, "farense.errors": {"farense.codes"}},  # a circle
])
def test_the_checks_find_what_they_look_for(probe):
    """The walkers above would see a violation: an upward edge and a circle, planted in the real graph."""
    edges = graph()
    for m, targets in probe.items():
        edges[m] = edges[m] | targets
    upward = [(m, t) for m, ts in edges.items() for t in ts if layer_of(t) > layer_of(m)]
    assert upward or cycles(edges)
