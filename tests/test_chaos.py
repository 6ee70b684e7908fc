"""What a SIGKILL of the bot or its trainer leaves behind, and what comes next.

Each test is a defect benchmarks/chaos_bench.py found: a bot killed while its retrain
was training left the run "running" in the store, so every later /retrain was refused
("A retrain is already running") for good, and its trainer child trained on for nobody
(the fast test restarts a bot on a store in that state, against a vLLM-shaped server;
the slow one kills the real bot mid-retrain on the tiny base and restarts it on the same
data dir); a killed trainer was reported by its last log line, not the kill; a promote
killed after its pointer swap left PROMOTED and the served adapter disagreeing; and a
killed, unreaped trainer (a zombie) kept its staging dir through every start-up check.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from bot.retrain import MSG_INTERRUPTED
from bot.store import Store
from devkit.fake_vllm import FakeVLLM
from tests.support.terminal import run_piped, write_config


def runs(db: Path) -> list[tuple]:
    con = sqlite3.connect(str(db))
    try:
        return con.execute("SELECT id, status, message FROM training_runs ORDER BY id").fetchall()
    finally:
        con.close()


@pytest.mark.slow  # runs `python -m bot` (against a vLLM-shaped server): seconds, not the fast tier
async def test_a_run_left_running_by_a_killed_bot_never_refuses_the_next_retrain(tmp_path, fake_vllm):
    config = write_config(tmp_path, fake_vllm.url)
    db = tmp_path / "data" / "loopcord.db"
    store = await Store.open(db)  # as the killed bot left it: its run row still "running"
    run_id = await store.start_run(trigger="manual", started_by=0, parent_version="v0001", n_corrections=1)
    await store.close()

    result = await run_piped(config, "/retrain\n/status\n/quit\n")

    assert result.returncode == 0, result.stderr
    assert "already running" not in result.stdout
    assert "No adapter is promoted yet" in result.stdout  # the refusal that really applies
    assert f"Last run: #{run_id} crashed" in result.stdout and MSG_INTERRUPTED in result.stdout
    assert runs(db) == [(run_id, "crashed", MSG_INTERRUPTED)]


# ------------------------------------------------------------------ the real bot, killed


def _children(pid: int) -> dict[int, str]:
    """Live descendants of `pid` -> their command lines."""
    parent_of = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z":
            parent_of[int(p.name)] = int(fields[1])
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parent_of.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
                except OSError:
                    continue
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.slow
async def test_a_bot_killed_mid_retrain_takes_its_children_and_retrains_after_a_restart(tmp_path, tiny_base):
    from benchmarks.chaos_bench import CORRECTION, QUESTION, BotLab, Tally, lab_config, make_adapter, seed_registry

    config = lab_config(tmp_path / "lab", tiny_base, calibrate_steps=100)
    seed_registry(config, make_adapter(tiny_base, tmp_path / "lora", seed=0, random_init=False))
    lab, tally = BotLab(config, tmp_path), Tally()
    bot = await lab.start_bot(tally)
    assert bot is not None, tally
    try:
        await lab.ask(QUESTION)
        at = await bot.send("/flag")
        await bot.expect(r"^Flagged\.", at, 60)
        at = await bot.send(f"/correct {CORRECTION}")
        _, m = await bot.expect(r"^Correction #(\d+) saved as pending", at, 60)
        at = await bot.send(f"/approve {m.group(1)}")
        await bot.expect(r"approved", at, 60)
        at = await bot.send("/retrain")
        await bot.expect(r"🛠️ calibrate: \d+ steps", at, 300)  # the trainer child is training
        children = _children(bot.pid)
        assert any(" calibrate " in c for c in children.values()), children
        bot.kill()
        await bot.proc.wait()
        gone_by = time.monotonic() + 10  # the worker drains 5 s at most; the trainer goes at once
        while any(_alive(p) for p in children) and time.monotonic() < gone_by:
            await asyncio.sleep(0.1)
        left = [c for p, c in children.items() if _alive(p)]
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert left == [], f"outlived the bot: {left}"

        bot = await lab.start_bot(tally)  # same data dir: the lock, the store and the registry as left
        assert bot is not None, tally
        at = await bot.send("/retrain")
        i, _ = await bot.expect(r"^Retraining on 1 approved correction not learned yet|already running", at, 60)
        assert bot.lines[i].startswith("Retraining on 1 approved correction not learned yet"), bot.lines[i]
        # (the gate's own line, "Gate for v0002 vs v0001: failed", comes before the verdict)
        i, _ = await bot.expect(r"is now live|did not pass the gate|stopped|^(?!Gate for ).*failed", at, 300)
        # The re-run goes through to the gate's verdict. Whether the tiny base learns "Paris." in 100 steps
        # depends on the CPU it was trained on (it does on an AVX-512 Xeon, not on an AVX2 AMD EPYC); the
        # kills are under test here, the gate in test_loop / test_trainer.
        assert "is now live" in bot.lines[i] or "did not pass the gate" in bot.lines[i], bot.lines[at:]
        verdict = "succeeded" if "is now live" in bot.lines[i] else "rejected"
        assert [r[1] for r in runs(lab.db)] == ["crashed", verdict]
        con = sqlite3.connect(str(lab.db))
        try:  # learned by the run that went live, not by the one that was killed (a rejected run leaves it waiting)
            learned_by = 2 if verdict == "succeeded" else None
            assert con.execute("SELECT status, trained_run_id FROM corrections").fetchall() == [("approved", learned_by)]
        finally:
            con.close()
    finally:
        if lab.bot is not None:
            await lab.bot.quit()


# ------------------------------------------------------------------ a killed trainer, in words


def test_a_trainer_killed_by_a_signal_is_said_so_not_its_last_log_line():
    from trainer.protocol import Outcome

    killed = Outcome(command="calibrate", exit_code=-9,
                     stderr_tail=("calibrate: 480 samples ({'corrections_in_file': 1}), parent v0001",))
    assert killed.reason == "the trainer process was killed by SIGKILL, e.g. by the kernel's out-of-memory killer"
    assert "SIGTERM" in Outcome(command="eval", exit_code=-15).reason
    crashed = Outcome(command="eval", exit_code=1, stderr_tail=("RuntimeError: boom",))
    assert crashed.reason == "RuntimeError: boom"  # a crash's own last words still explain it


def test_a_promote_killed_after_its_pointer_swap_counts_as_promoted(tmp_path):
    from bot.retrain import promote_went_through
    from trainer.registry import Registry

    reg = Registry(tmp_path / "adapters")
    for _ in range(2):
        staging = reg.new_staging_dir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (staging / name).write_text("{}")
        reg.commit(staging, {"stage": "calibrate", "gate": {"passed": True}})
    reg.promote("v0001", force=True)
    assert not promote_went_through(reg, "v0002")  # the promote never happened: still v0001
    # as a promote killed between the PROMOTED swap and its history line leaves the registry
    (reg.root / "PROMOTED").write_text("v0002\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = reg.root / f".PROMOTED.{dead.pid}.tmp"  # and the dead writer's temp file
    leftover.write_text("v0002")
    assert promote_went_through(reg, "v0002")
    # The bot only reads the registry: what the kill left is reported, and the trainer repairs it
    # (`python -m trainer check`, or the next trainer run that trains or gates).
    assert reg.history()[-1]["version"] == "v0001" and leftover.exists()
    assert len(reg.problems()) == 4
    reg.check()
    assert reg.history()[-1]["version"] == "v0002" and not leftover.exists() and reg.problems() == []


def test_a_dead_but_unreaped_writer_does_not_keep_its_staging_dir(tmp_path):
    """A trainer whose bot was SIGKILLed dies (its parent-death signal) but stays a zombie
    until init reaps it, which in a container may never happen: its half-written version
    must still be cleaned at the next start, not kept for a writer that will never finish."""
    from trainer.registry import Registry

    reg = Registry(tmp_path / "adapters")
    zombie = subprocess.Popen(["true"])  # exits at once; not waited for, so it stays a zombie
    try:
        deadline = time.monotonic() + 10
        while _alive(zombie.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert Path(f"/proc/{zombie.pid}").exists()  # dead but still in the process table
        staging = reg.root / f".staging-{zombie.pid}-0"
        staging.mkdir(parents=True)
        (staging / "adapter_model.safetensors").write_bytes(b"half")
        assert reg.check() == [f"removed .staging-{zombie.pid}-0"]
        assert not staging.exists()
    finally:
        zombie.wait()


@pytest.mark.slow  # runs `python -m bot` (against a vLLM-shaped server): seconds, not the fast tier
async def test_an_outside_server_a_killed_bot_left_asleep_is_woken_at_the_next_start(tmp_path):
    """gpu_policy: pause puts vLLM to sleep (its weights leave the GPU) while the trainer
    runs; a bot killed then never woke it, and the restarted bot did not either."""
    fake = FakeVLLM(max_model_len=2048, dev_mode=True, sleeping=True)  # as the killed bot left it
    await fake.start()
    try:
        config = write_config(tmp_path, fake.url, training={"gpu_policy": "pause"})
        result = await run_piped(config, "Hello?\n/quit\n")
    finally:
        await fake.close()
    assert result.returncode == 0, result.stderr
    assert fake.sleeping is False
    wake = [i for i, r in enumerate(fake.requests) if r["path"] == "/wake_up"]
    chats = [i for i, r in enumerate(fake.requests) if r["path"] == "/v1/chat/completions"]
    assert wake and chats and wake[0] < chats[0]  # woken before the first answer
