"""The import graph of the three packages, read from the source with `ast` (lazy imports inside
functions and `TYPE_CHECKING` imports count too): dependencies point one way, `service -> model ->
parallel`, and no module reaches itself through its imports. Guards against the cycles a reader
trips on (engine <-> batcher, cli <-> launcher) coming back, and keeps the engine step's parts apart."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"parallel": 0, "model": 1, "service": 2}  # a package may import its own layer and those below


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from a.b import c` is a.b.c when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in LAYERS}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_dependencies_point_one_way():
    """Imports go service -> model -> parallel only: a wrong-way edge drags the HTTP stack into the ranks."""
    wrong = [
        f"{a} -> {b}" for a, deps in graph().items() for b in deps if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]
    ]
    assert not wrong, wrong


def test_no_import_cycles():
    """No module imports itself through others (two cycles made the engine and the CLI hard to change)."""
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_graph_is_read():
    """The walk finds the project's modules and their edges (an empty graph would pass the others)."""
    edges = graph()
    assert len(edges) > 30 and sum(map(len, edges.values())) > 60


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_scheduler_and_the_model_runner_meet_only_in_the_engine_loop():
    """A step is plan -> execute -> update, and only `service.engine.core` holds both parts: the scheduler
    never reaches the runner, by import or through a reference it was handed (the batcher once called 13
    members of an engine object it did not import), nor the runner the scheduler."""
    edges = graph()
    scheduler, runner, core = "service.engine.scheduler", "service.engine.runner", "service.engine.core"
    assert runner not in reach(edges, scheduler) and core not in reach(edges, scheduler)
    assert scheduler not in reach(edges, runner) and core not in reach(edges, runner)
    assert {scheduler, runner} <= edges[core]
    runner_members = {
        node.name
        for node in ast.walk(ast.parse((ROOT / "service/engine/runner.py").read_text()))
        if isinstance(node, ast.FunctionDef)
    } - {"__init__"}
    called = {  # methods the scheduler calls, on whatever object
        node.func.attr
        for node in ast.walk(ast.parse((ROOT / "service/engine/scheduler.py").read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert runner_members & called == set(), runner_members & called
