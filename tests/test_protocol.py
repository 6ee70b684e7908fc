"""Contracts owned once (issue 31): the project's modules import each other without a cycle,
statuses and the trainer's payloads have one definition each, and the bot only reads the
adapter registry (repairs are `python -m trainer check`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "model", "trainer")


# ------------------------------------------------------------------ the import graph


def project_modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement, at module level or inside a function, except those under
    `if TYPE_CHECKING:` (they never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (module-level and function-level imports)."""
    modules = project_modules(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # a relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the submodule; `from mod import name` the module.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` where c is a name
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_a_cycle(graph, set(c), c[0]) for c in components]


def _a_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path from `start` back to itself inside one component (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a component but on no cycle")


def test_the_project_modules_import_each_other_without_a_cycle():
    """A cycle hidden by a function-local import still fails here: every import counts."""
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "d.py").write_text("from . import c\nfrom .a import f\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == set()  # TYPE_CHECKING imports never run
    assert graph["pkg.d"] == {"pkg.c", "pkg.a"}  # relative imports resolve
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


# ------------------------------------------------------------------ statuses, owned once


async def test_each_status_column_allows_exactly_its_set_and_nothing_else(tmp_path):
    import sqlite3

    import pytest

    from bot.store import STATUS_COLUMNS, AnswerStatus, RunStatus, RunTrigger, Store, _checked_values

    store = await Store.open(tmp_path / "loopcord.db")
    try:
        exchange = await store.log_exchange(user_id=1, prompt_messages=[{"role": "user", "content": "Hi?"}],
                                            answer="Hello.", status=AnswerStatus.CUT_OFF)
        for status in RunStatus:  # every member goes in, as it is on disk
            run = await store.start_run(RunTrigger.SCHEDULE)
            await store.finish_run(run, status)
            assert (await store.get_run(run))["status"] == status.value
        assert (await store.get_exchange(exchange))["status"] == "cut_off"
    finally:
        await store.close()
    con = sqlite3.connect(tmp_path / "loopcord.db")
    try:
        for table, column, allowed in STATUS_COLUMNS:
            sql = con.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
            assert _checked_values(sql, column) == {m.value for m in allowed}, (table, column)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            con.execute("UPDATE training_runs SET status = 'paused'")
    finally:
        con.close()


async def test_a_store_whose_constraints_lag_behind_a_status_set_is_refused_at_open(tmp_path):
    """Adding a status without the migration that rebuilds its table fails at open, naming the
    column, not at the first INSERT of the new value (mid-retrain)."""
    import sqlite3

    import pytest

    from bot.store import MIGRATIONS, Store, StoreError

    path = tmp_path / "loopcord.db"
    con = sqlite3.connect(path)
    for i, script in enumerate(MIGRATIONS):  # as if v3 had not known cancelled runs
        con.executescript(script.replace(", 'cancelled'", "") if i == 2 else script)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=r"training_runs\.status allows .* a schema migration is missing"):
        await Store.open(path)
