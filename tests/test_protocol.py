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


# ------------------------------------------------------------------ the trainer's payloads, typed once


def _trainer_cli(tmp_path, *args):
    """`python -m trainer ARGS --progress json` against a registry in tmp_path (no model needed)."""
    import json
    import os
    import subprocess
    import sys

    config = tmp_path / "config.yaml"
    if not config.exists():
        (tmp_path / "base").mkdir()
        (tmp_path / "base" / "config.json").write_text("{}")
        config.write_text(f"model:\n  base: {tmp_path / 'base'}\ntraining:\n  registry_dir: {tmp_path / 'reg'}\n")
    out = subprocess.run([sys.executable, "-m", "trainer", *args, "--config", str(config), "--progress", "json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()], out.stderr


def _add_version(reg, passed=True) -> str:
    staging = reg.new_staging_dir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staging / name).write_text("{}")
    return reg.commit(staging, {"stage": "calibrate", "parent": None, "base": "/base", "gate": {"passed": passed}})


def _kill_mid_promote(reg, version: str):
    """The registry as a promote killed after its PROMOTED swap leaves it, with the dead
    writer's temp file: nothing in history.jsonl, the manifests not updated."""
    import subprocess

    (reg.root / "PROMOTED").write_text(version + "\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = reg.root / f".PROMOTED.{dead.pid}.tmp"
    leftover.write_text(version)
    return leftover


def test_every_event_the_cli_prints_is_one_of_the_protocol_types(tmp_path):
    from trainer.protocol import CheckDone, ErrorEvent, ListDone, PointerDone, parse_event
    from trainer.registry import Registry

    _trainer_cli(tmp_path, "list")  # writes the config
    reg = Registry(tmp_path / "reg")
    v1, v2 = _add_version(reg), _add_version(reg)
    seen = []
    for args, kind in ((("promote", v1), PointerDone), (("promote", v2), PointerDone), (("rollback",), PointerDone),
                       (("list",), ListDone), (("check",), CheckDone), (("rollback",), ErrorEvent)):
        code, events, stderr = _trainer_cli(tmp_path, *args)
        assert len(events) == 1 and isinstance(parse_event(events[0]), kind), (args, events, stderr)
        assert parse_event(events[0]).as_event() == events[0]  # nothing in it the type does not know
        seen.append(parse_event(events[0]))
    assert [e.version for e in seen[:3]] == [v1, v2, v1] and seen[1].previous == v1
    assert [row["version"] for row in seen[3].versions] == [v1, v2] and seen[4].repaired == ()
    assert seen[5].exit_code == 2 and "nothing to roll back to" in seen[5].message


def test_events_round_trip_through_json_and_a_partial_done_event_is_read_as_its_header():
    import json

    from trainer.protocol import (BootstrapDone, CheckedCorrection, Command, DoneEvent, ErrorEvent, EvalDone,
                                  PhaseEvent, ProgressEvent, RefusedCorrection, TrainDone, Verdict, parse_event)

    gate = EvalDone(command=Command.EVAL, version="v0002", path="/r/v0002", verdict=Verdict.FAILED, passed=False,
                    reference="v0001", checks=[{"name": "identity", "passed": False}], metrics={"x": 1.0},
                    report="/r/v0002/eval.json", chart=None,
                    corrections=(CheckedCorrection(id=4, learned=False, question="q", correction="c", answer="a"),),
                    learned=(), not_learned=(4,))
    events = [PhaseEvent("load", "loading"), ProgressEvent("calibrate", 3, 10, 0.5, None, 12.0),
              ErrorEvent("no", 2, (RefusedCorrection(4, "I am ChatGPT.", "it claims another identity"),)),
              TrainDone(command=Command.CALIBRATE, version="v0002", path="/r/v0002", stage="calibrate",
                        parent="v0001", samples={"total": 3}, train={"steps": 2}),
              gate, BootstrapDone(command=Command.BOOTSTRAP, version="v0002", path="/r/v0002", gate=gate),
              BootstrapDone(command=Command.BOOTSTRAP, version="v0001", path="/r/v0001")]
    for event in events:
        assert parse_event(json.loads(json.dumps(event.as_event()))) == event
    assert ErrorEvent("boom").as_event() == {"event": "error", "message": "boom"}  # nothing empty is sent
    partial = {"event": "done", "command": "eval", "version": "v0009", "corrections": [{"id": 1}]}
    assert parse_event(partial) == DoneEvent(command=Command.EVAL, version="v0009")
    assert EvalDone.from_event(partial) is None  # the bot's gate read refuses it
    assert parse_event({"event": "progress", "stage": "x", "step": "3", "total": 4}) is None
    assert parse_event({"event": "done", "command": "dance"}) is None


def test_a_correction_record_goes_from_the_store_to_the_trainer_through_one_type(tmp_path):
    import asyncio
    import dataclasses
    import json

    import pytest

    from bot.store import CorrectionStatus, Store
    from trainer.corrections import load_corrections
    from trainer.datasets import DataError
    from trainer.protocol import CorrectionRecord

    async def export() -> list[dict]:
        store = await Store.open(tmp_path / "loopcord.db")
        try:
            exchange = await store.log_exchange(user_id=7, prompt_messages=[{"role": "user", "content": "Where?"}],
                                                answer="Mars.", status="complete")
            cid = await store.add_correction(exchange, 7, "Earth.")
            await store.set_correction_status(cid, CorrectionStatus.APPROVED, 1)
            return await store.export_approved_corrections()
        finally:
            await store.close()

    (row,) = asyncio.run(export())
    record = CorrectionRecord.parse(row)
    assert record.as_dict() == row and set(row) == {f.name for f in dataclasses.fields(CorrectionRecord)}
    path = tmp_path / "corrections.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (read,) = load_corrections(path)
    assert (read.id, read.correction, read.question, read.bad_answer) == (record.id, "Earth.", "Where?", "Mars.")
    with pytest.raises(ValueError, match="missing 'messages'"):
        CorrectionRecord.parse({"id": 1, "correction": "x"})
    path.write_text(json.dumps({**row, "id": True}) + "\n")
    with pytest.raises(DataError, match=r"corrections.jsonl:1: 'id' must be int"):
        load_corrections(path)


def test_the_progress_reporter_writes_only_protocol_events(tmp_path):
    import io
    import json

    from trainer.progress import Progress
    from trainer.protocol import Command, ErrorEvent, ListDone, PhaseEvent, ProgressEvent, parse_event

    out = io.StringIO()
    progress = Progress("json", stream=out)
    progress.phase("load", "loading")
    progress.start("anchor", 2)
    progress.step(1, 0.5, 10)
    progress.done(ListDone(command=Command.LIST, versions=[]))
    progress.error("too late")  # after the final event: dropped
    kinds = [type(parse_event(json.loads(line))) for line in out.getvalue().splitlines()]
    assert kinds == [PhaseEvent, ProgressEvent, ProgressEvent, ListDone]
    out = io.StringIO()
    Progress("json", stream=out).error("bad config", 2)
    assert parse_event(json.loads(out.getvalue())) == ErrorEvent("bad config", 2)


def test_a_long_phase_is_said_again_until_the_next_event_so_a_pipe_never_sits_silent():
    """The gate asks its questions for minutes with no step to count: the phase repeats with its
    time until something else is said, and nothing follows the final event."""
    import io
    import json
    import time

    from trainer.progress import Progress
    from trainer.protocol import Command, ListDone, PhaseEvent, parse_event

    out = io.StringIO()
    progress = Progress("json", stream=out, heartbeat_s=0.2)
    progress.phase("eval", "evaluating v0002")
    time.sleep(1.0)
    progress.start("calibrate", 2)  # a stage counts its own steps: no more repeats of the phase
    repeats = len(out.getvalue().splitlines()) - 2
    time.sleep(0.6)
    assert len(out.getvalue().splitlines()) == repeats + 2
    progress.phase("promote", "promoting v0002")
    progress.done(ListDone(command=Command.LIST, versions=[]))
    time.sleep(0.6)
    events = [parse_event(json.loads(line)) for line in out.getvalue().splitlines()]
    again = [e for e in events if isinstance(e, PhaseEvent) and e.phase == "eval"][1:]
    assert 2 <= len(again) <= 6 and all("evaluating v0002 (still at it, " in e.message for e in again)
    assert isinstance(events[-1], ListDone)


# ------------------------------------------------------------------ the bot only reads the registry


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_bot_modules_never_call_a_registry_writer():
    """bot/ reads the registry (trainer.registry's read API); writes go through `python -m trainer`."""
    writers = {"check", "commit", "update", "promote", "rollback", "import_adapter", "new_staging_dir",
               "clean_stale_staging", "clean_stale_temp_files", "locked"}
    found = []
    for path in sorted((ROOT / "bot").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in writers
                    and "registry" in ast.unparse(node.func.value).lower()):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


def test_a_half_written_registry_is_reported_read_only_and_repaired_by_trainer_check(tmp_path):
    from bot.retrain import promote_went_through
    from bot.runtime import live_from_registry, registry_notice
    from trainer.registry import Registry

    _trainer_cli(tmp_path, "list")  # writes the config
    reg = Registry(tmp_path / "reg")
    v1, v2 = _add_version(reg), _add_version(reg)
    reg.promote(v1)
    assert registry_notice(reg) is None
    leftover = _kill_mid_promote(reg, v2)
    before = _snapshot(reg.root)
    # What the bot does with it: serve what PROMOTED says, say what is wrong, change nothing.
    assert live_from_registry(reg).version == v2 and promote_went_through(reg, v2)
    notice = registry_notice(reg)
    assert "history.jsonl does not record that v0002 is promoted" in notice
    assert f"{v1}/manifest.json still says promoted" in notice and leftover.name in notice
    assert "`python -m trainer check`" in notice
    assert _snapshot(reg.root) == before
    # The repair is a trainer command that says what it did.
    code, events, stderr = _trainer_cli(tmp_path, "check")
    assert code == 0 and len(events[0]["repaired"]) == 4, (events, stderr)
    assert "repaired: history.jsonl: recorded that v0002 is promoted" in stderr
    assert registry_notice(reg) is None and reg.history()[-1]["version"] == v2 and not leftover.exists()
    assert reg.get(v2)["status"] == "promoted" and reg.get(v1)["status"] == "superseded"
    code, events, stderr = _trainer_cli(tmp_path, "check")
    assert events[0]["repaired"] == [] and "nothing to repair" in stderr
    # PROMOTED naming a missing version: check cannot guess; it says what to run.
    (reg.root / "PROMOTED").write_text("v0009\n")
    code, events, _ = _trainer_cli(tmp_path, "check")
    assert code == 2 and "rollback --to VERSION" in events[0]["message"]


async def test_the_bot_starts_on_a_half_written_registry_serves_the_promoted_version_and_changes_nothing(
        tmp_path, fake_vllm):
    from tests.support.terminal import run_piped, write_config
    from trainer.registry import Registry

    config = write_config(tmp_path, fake_vllm.url)
    reg = Registry(tmp_path / "data" / "adapters")
    v1, v2 = _add_version(reg), _add_version(reg)
    reg.promote(v1)
    _kill_mid_promote(reg, v2)
    before = _snapshot(reg.root)
    result = await run_piped(config, "Hello?\n/status\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert list(fake_vllm.loras.values()) == [str(reg.path(v2))]  # the promoted version is served
    assert "Registry: ⚠️" in result.stdout and "python -m trainer check" in result.stdout, result.stdout
    assert "history.jsonl does not record that v0002 is promoted" in result.stdout
    assert _snapshot(reg.root) == before  # the bot repaired nothing


def test_a_trainer_run_that_gates_repairs_the_registry_first(tmp_path):
    """What the bot used to repair at its start, the next trainer run that reads the lineage
    repairs first: the gate's reference (the nearest version that was live) is then right."""
    from trainer.registry import Registry

    _trainer_cli(tmp_path, "list")  # writes the config
    reg = Registry(tmp_path / "reg")
    v1, v2 = _add_version(reg), _add_version(reg)
    reg.promote(v1)
    _kill_mid_promote(reg, v2)
    code, events, stderr = _trainer_cli(tmp_path, "eval", "--version", "v0009")  # stops before any model loads
    assert code == 2 and "no adapter version 'v0009'" in events[-1]["message"], (events, stderr)
    assert "registry repaired: history.jsonl: recorded that v0002 is promoted" in stderr
    assert reg.problems() == [] and reg.get(v2)["status"] == "promoted"
