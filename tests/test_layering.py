"""Layers: the core imports no training framework and no Textual; the store, the TUI's data layer and the CLI's
summary/inspect import no torch either; no import circles; the optimizer hook is removable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compass_monitor import MonitorConfig, open_run
from compass_monitor.integrations.pytorch import watch

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "verl", "accelerate", "trl", "deepspeed")

#: modules that only read run stores: they start without torch (a laptop reads a cluster's runs)
READERS = (
    "compass_monitor.store",
    "compass_monitor.store.inspect",
    "compass_monitor.summary",
    "compass_monitor.aggregates",
    "compass_monitor.tui.data",
    "compass_monitor.tui.source",
    "compass_monitor.tui.follow",
    "compass_monitor.tui.timeline",
)

#: import circles still in the code, as sets of modules; each entry goes when its circle goes
KNOWN_CIRCLES: set[frozenset[str]] = set()


def imported_by(statement: str) -> set[str]:
    """Top-level names in sys.modules after ``statement`` in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_core_imports_no_framework():
    loaded = imported_by("import compass_monitor, compass_monitor.store, compass_monitor.summary, compass_monitor.cli")
    assert not loaded & {*FRAMEWORKS, "textual"}, f"core imported {sorted(loaded & {*FRAMEWORKS, 'textual'})}"


@pytest.mark.parametrize("module", READERS)
def test_store_readers_import_no_torch_no_textual_no_framework(module):
    loaded = imported_by(f"import {module}")
    assert not loaded & {"torch", "textual", *FRAMEWORKS}, f"{module} imported {sorted(loaded & {'torch', 'textual', *FRAMEWORKS})}"


@pytest.mark.parametrize("command", ["summary", "inspect"])
def test_cli_summary_and_inspect_import_no_torch(command, tmp_path):
    from synthetic_runs import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", snapshots=2)
    # The command runs in the interpreter whose modules are listed (on stderr, after the command's output).
    code = (f"import sys; from compass_monitor.cli import main; code = main([{command!r}, {str(run)!r}]); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "matrices" in out.stdout  # the command did its work
    loaded = set(out.stderr.split())
    assert not loaded & {"torch", "textual", *FRAMEWORKS}, f"{command} imported {sorted(loaded & {'torch', 'textual', *FRAMEWORKS})}"


# -- import circles --------------------------------------------------------------------------
def package_modules() -> dict[str, Path]:
    """Module name -> file for compass_monitor/ and integrations/ (installed as compass_monitor.integrations)."""
    found = {}
    for base, package in ((ROOT / "compass_monitor", "compass_monitor"), (ROOT / "integrations", "compass_monitor.integrations")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges module -> modules of this project it imports, at module level or inside functions (lazy imports
    are still a circle in the design); imports under ``if TYPE_CHECKING:`` are left out."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circle_finder_finds_a_lazy_circle(tmp_path):
    """The walk sees a circle made by a function-level import (the kind the demo and the TUI had)."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}
    assert circles(graph) == {frozenset({"p.a", "p.b"})}
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from . import a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import x\n")
    (tmp_path / "c.py").write_text("from .b import a\n")
    modules = {f"p.{n}": tmp_path / f"{n}.py" for n in "abc"}
    graph = import_graph(modules)
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.b"}}
    assert circles(graph) == {frozenset({"p.a", "p.b"})}


def test_no_import_circles():
    modules = package_modules()
    assert {"compass_monitor.tui.screens.run", "compass_monitor.demo", "compass_monitor.integrations.hf"} <= set(modules)
    found = circles(import_graph(modules))
    new = found - KNOWN_CIRCLES
    assert not new, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in new)
    gone = KNOWN_CIRCLES - found
    assert not gone, "these circles are gone: delete them from KNOWN_CIRCLES: " + "; ".join(" <-> ".join(sorted(c)) for c in gone)


def test_hook_removed_on_close(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2))
    for _ in range(2):
        model(torch.randn(3, 6)).sum().backward()
        optimizer.step()
    monitor.close()
    assert monitor.step == 2
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()  # after close: not counted, nothing written
    assert monitor.step == 2
    assert open_run(tmp_path / "run").steps.tolist() == [1, 2]
