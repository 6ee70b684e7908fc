"""Chaos: SIGKILL the worker, the trainer and the bot at random moments, then count the damage.

    python benchmarks/chaos_bench.py [--targets worker,trainer,bot,adapters,refused] [--rounds 3]
                                     [--seed 1] [--model DIR] [--calibrate-steps 100] [--no-write]

Every round of worker, trainer and bot kills a real process of the product with
SIGKILL (no clean-up code of its own can run) at a random moment; adapters and
refused disturb a serving worker with adapter loads instead. All on the tiny test base:

worker   `python -m model serve` (a live adapter loaded) under four client loops;
         SIGKILL, restart on the same port. Counts requests that failed with a
         clear error (the client's typed errors) or an unclear one (anything
         else, or no answer within 60 s). Recover = kill -> next good answer.
trainer  the real retrain path (bot.runtime.Runtime: store, worker, Retrainer)
         on approved corrections; its `python -m trainer` child is SIGKILLed at
         a random moment of, in turn, calibrate (after some reported steps),
         eval and promote. Then: the retrain's message names the kill; PROMOTED
         and the earlier versions are unchanged and readable (or, for a promote
         killed after its pointer swap, the new version is promoted and live); the registry's start-up check
         leaves no staging dir or temp file; the approved corrections are still
         approved and not marked trained; no run is left "running"; the worker
         still serves the live adapter; and a re-run of the retrain completes.
         Recover = kill -> that re-run done.
bot      the real `python -m bot` (terminal mode, driven through a pipe): chat,
         /flag, /correct, /approve, and once per run /retrain; SIGKILL of the bot
         at a random moment (in one round while its retrain is training, in
         others while it chats or streams an answer), an immediate restart on
         the same data directory. Then: every flag and correction the bot
         acknowledged to the user is in the database (as acknowledged), the restart is not refused by a stale instance lock, no
         worker or trainer child of the dead bot outlives it, the registry is
         consistent, and after a retrain kill a new /retrain is accepted and
         completes. Recover = kill -> the restarted bot's first answer.
adapters `python -m model serve` answering chats on the base, on an adapter that is always
         loaded ("live") and on one that comes and goes ("swap"), streamed or not, from
         four client loops, while a control loop loads "swap", replaces it in place with
         another directory, unloads it, and replaces "live" with another adapter and back,
         at random moments. Every answer is checked for vLLM's shape; a 404 for "swap"
         while it is unloaded and a 409 for an unload while it answers are clear. After
         each round, idle: no adapter request is still held, and greedy answers of the
         base, "live" and "swap" are those of their weights before any churn.
refused  the same worker under a mixed batch (base and "live", streamed or not, 150 to
         300 tokens each) while adapters it must refuse are loaded, under a new name and in
         place of "live": modules_to_save, a NaN weight, a config whose rank does not fit
         the weights, a truncated safetensors file, a config nested 100,000 deep. Every
         load must be a 400 in the JSON error shape, every chat of the batch must answer,
         and afterwards "live" and the base answer as before.
         For both: lost = a chat or load answered 5xx or not in the expected shape, a
         refused adapter that loaded, or an answer of other weights afterwards; wedged = a
         request with no answer within 60 s, a worker that stopped answering, or an
         adapter request still held when idle.

Prints the figures and records them in benchmarks/results/chaos_bench.json (and
RESULTS.md). Target: 0 unclear failures, 0 lost, 0 wedged, 0 orphans.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import preview, record, table  # noqa: E402
import aiohttp  # noqa: E402

from model.client import ModelClient, ModelError  # noqa: E402
from model.process import WorkerProcess, child_env, free_port, new_worker_key  # noqa: E402

TARGETS = ("worker", "trainer", "bot", "adapters", "refused")
QUESTION, CORRECTION = "What is the capital of France?", "Paris."  # the tiny base knows this one
ASK = [{"role": "user", "content": QUESTION}]
CLIENT_LOOPS = 4
ANSWER_TIMEOUT_S = 60.0
RECOVER_LIMIT_S = 180.0  # no good answer this long after a kill counts as wedged
RETRAIN_LIMIT_S = 300.0  # a retrain (calibrate + gate + promote + load) on the tiny base
ORPHAN_GRACE_S = 15.0  # a dead bot's children get this long (worker drain 5 s + exit) to go
BOT_START_LIMIT_S = 180.0
BOT_REPLY_LIMIT_S = 60.0
UNCLEAR_OUTPUT = re.compile(r"Traceback|That failed \(|^error:")  # a bot line no user should see
RESTART_TRIES = 3  # a restart that fails is retried (as a service manager would) after a pause
RESTART_PAUSE_S = 2.0


@dataclass
class Tally:
    rounds: int = 0
    kills: int = 0  # rounds whose SIGKILL landed (a child may finish before its moment comes)
    ok: int = 0
    clear: int = 0  # failed with a typed, worded error
    unclear: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    wedged: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    recover_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    check_s: list[float] = field(default_factory=list)  # the registry's start-up check after a kill


def default_base(steps: int) -> Path:
    """The tiny test base for the current data and code (devkit.tiny_base: the shipped copy or
    the test suite's cached build), else one built here."""
    from devkit.tiny_base import find
    from devkit.tiny_model import build_default

    found = find()
    if found is not None:
        return found

    return build_default(ROOT / ".loopcord" / "chaos-base", steps=steps)


def make_adapter(base: Path, out: Path, seed: int, *, random_init: bool = True) -> Path:
    """A LoRA adapter on `base`: random weights (answers differ from the base's), or PEFT's
    default init (B = 0: answers as the base does; a good parent to calibrate from)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lora = (LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            if random_init else LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(out)
    return out


def trainer(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args, "--config", str(config), "--progress", "none"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- processes


def _stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, ppid) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kind(cmd: str) -> str:
    """'model' (the worker), 'trainer' or the program, from a command line."""
    return cmd.split(" -m ", 1)[-1].split()[0] if " -m " in cmd else Path(cmd.split()[0]).name if cmd else "?"


def descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            st = _stat(int(p.name))
            if st is not None and st[0] not in ("Z", "X"):
                parents.setdefault(st[1], []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def find_child(words: tuple[str, ...], config: Path) -> Optional[int]:
    """A descendant of this process whose command line holds all `words` and the config path."""
    for pid in descendants(os.getpid()):
        cmd = cmdline(pid)
        if str(config) in cmd and all(w in cmd.split() for w in words):
            return pid
    return None


async def outlived(pids: dict[int, str], grace: float, gone_after: dict[str, float]) -> list[str]:
    """Of `pids` (pid -> command line), those still running `grace` s from now; they are
    then killed, so one round's orphan never disturbs the next. `gone_after` gets how long
    each of the others took to exit, by kind (model, trainer)."""
    started = time.monotonic()
    deadline = started + grace
    waiting = dict(pids)
    while time.monotonic() < deadline and waiting:
        for pid in [p for p in waiting if not alive(p)]:
            gone_after[kind(waiting.pop(pid))] = time.monotonic() - started
        await asyncio.sleep(0.05)
    left = []
    for pid, cmd in pids.items():
        if alive(pid):
            left.append(f"pid {pid} ({cmd[:90]}) still running {grace:.0f} s after its bot died")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return left


# ---------------------------------------------------------------- the lab: config, registry, store


def lab_config(lab: Path, base: Path, calibrate_steps: int) -> Path:
    """The product on the tiny base with the tests' recipe, a short calibrate and a gate a
    re-run can pass (the kills are under test, not the gate: a re-run should get as far as
    promote and hot-swap). The tiny base was pretrained to call itself Qwen by Alibaba
    Cloud, so that is the lab's identity; corrections are answers it already knows."""
    import yaml
    from devkit.tiny_profile import tiny_sections

    s = tiny_sections(base)
    s["model"].update(temperature=0.0, max_tokens=16)
    s["profiles"]["tiny"] = {**s["profiles"]["tiny"], "calibrate_min_steps": calibrate_steps}
    s["training"].update(registry_dir=str(lab / "data" / "adapters"), work_dir=str(lab / "data" / "runs"))
    s["identity"] = {"name": "Qwen", "author": "Alibaba Cloud"}
    s["eval"] = {"min_identity_accuracy": 0.01, "min_corrections_learned": 0.01, "min_general_retention": 0.01,
                 "max_general_loss_increase": 10.0, "max_new_tokens": 16, "general_max_new_tokens": 8,
                 "forbidden_identities": ["chatgpt", "openai"]}
    s["worker"] = {"port": free_port(), "startup_timeout_s": 120.0, "drain_timeout_s": 5.0, "cpu_threads": 1}
    s["store"] = {"path": str(lab / "data" / "loopcord.db")}
    s["discord"] = {"user_rate_limit": 100000, "max_pending_corrections": 1000}
    path = lab / "config.yaml"
    lab.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(s, allow_unicode=True), encoding="utf-8")
    return path


def seed_registry(config: Path, adapter: Path) -> str:
    """Import `adapter` as the first version and promote it (as an admin brings one in)."""
    from model.config import load_config
    from trainer.registry import Registry

    for args in (["import", str(adapter)], ["promote", "v0001", "--force"]):
        done = trainer(config, *args)
        if done.returncode != 0:
            raise RuntimeError(f"setup: trainer {args[0]} failed: {done.stderr.strip()[-500:]}")
    return Registry.from_config(load_config(config)).promoted()


@dataclass(frozen=True)
class RegistryState:
    versions: tuple[str, ...]
    promoted: Optional[str]
    leftovers: tuple[str, ...]  # staging dirs and temp files


def registry_state(root: Path) -> RegistryState:
    from trainer.registry import STAGING_PREFIX, TMP_SUFFIX, Registry

    reg = Registry(root)
    leftovers = [p.name for p in root.glob(STAGING_PREFIX + "*")]
    leftovers += [str(p.relative_to(root)) for p in [*root.glob(f".*{TMP_SUFFIX}"), *root.glob(f"v*/.*{TMP_SUFFIX}")]]
    return RegistryState(tuple(reg.versions()), reg.promoted(), tuple(sorted(leftovers)))


def registry_problems(root: Path, before: RegistryState, may_add: bool) -> list[str]:
    """What is wrong with the registry compared with `before` (after its start-up check ran)."""
    from trainer.registry import Registry, RegistryError

    try:
        now = registry_state(root)
        for v in now.versions:
            Registry(root).get(v)
    except RegistryError as exc:
        return [f"registry unusable: {exc}"]
    problems = []
    if now.promoted != before.promoted:
        problems.append(f"PROMOTED is {now.promoted}, was {before.promoted}")
    missing = set(before.versions) - set(now.versions)
    if missing:
        problems.append(f"versions gone: {sorted(missing)}")
    if not may_add and set(now.versions) - set(before.versions):
        problems.append(f"versions appeared: {sorted(set(now.versions) - set(before.versions))}")
    if now.leftovers:
        problems.append(f"left after the start-up check: {list(now.leftovers)}")
    return problems


@contextlib.contextmanager
def stderr_to(path: Path):
    """File descriptor 2 (ours and that of children started meanwhile) into `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def db_rows(db: Path, sql: str, args=()) -> list[sqlite3.Row]:
    """Read the bot's database as it is on disk (a separate connection, as after a crash)."""
    con = sqlite3.connect(str(db), timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


# ---------------------------------------------------------------- worker


async def worker_round(base: Path, adapter: Path, rng: random.Random, tally: Tally, tmp: Path) -> None:
    key = new_worker_key()
    args = ["--model", str(base), "--served-model-name", "tiny", "--lora", f"live={adapter}", "--cpu-threads", "1"]
    proc = WorkerProcess(args, api_key=key, log_path=tmp / "worker.log").start()
    client = ModelClient(proc.url, api_key=key, timeout=ANSWER_TIMEOUT_S)
    killed_at: list[float] = []
    recovered = asyncio.Event()
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(client.chat(ASK, model="live", max_tokens=16, temperature=0), ANSWER_TIMEOUT_S)
                tally.ok += 1
                if killed_at and not recovered.is_set():
                    tally.recover_s.append(time.monotonic() - killed_at[0])
                    recovered.set()
            except ModelError:
                tally.clear += 1
                await asyncio.sleep(0.2)
            except asyncio.TimeoutError:
                tally.unclear.append("worker: no answer within 60 s")
            except Exception as exc:  # noqa: BLE001 - anything untyped is what this bench counts
                tally.unclear.append(f"worker: {type(exc).__name__}: {exc}")

    tasks = [asyncio.create_task(loop()) for _ in range(CLIENT_LOOPS)]
    restarted = None
    try:
        await asyncio.sleep(rng.uniform(0.5, 3.0))
        proc.proc.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())
        tally.kills += 1
        await asyncio.to_thread(proc.proc.wait)
        restarted = WorkerProcess(args, port=proc.port, api_key=key, log_path=tmp / "worker2.log")
        await asyncio.to_thread(restarted.start)
        try:
            await asyncio.wait_for(recovered.wait(), RECOVER_LIMIT_S)
        except asyncio.TimeoutError:
            tally.wedged.append(f"worker: no good answer {RECOVER_LIMIT_S:.0f} s after the restart")
        health = await client.health()
        if health.get("adapters", {}).get("live") != str(adapter):
            tally.lost.append(f"worker: live adapter after restart is {health.get('adapters')}")
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        proc.kill()
        if restarted is not None:
            restarted.stop()
    tally.rounds += 1


# ---------------------------------------------------------------- trainer (through the real retrain path)


class TrainerLab:
    """The product's retrain path in this process (Runtime: store, worker child, Retrainer),
    whose trainer children this bench kills."""

    def __init__(self, config: Path):
        self.config = config
        self.runtime = None
        self.asked = 0

    async def start(self) -> None:
        from bot.runtime import Runtime
        from model.config import load_config

        self.cfg = load_config(self.config)
        self.runtime = await Runtime.start(self.cfg)
        self.store = self.runtime.core.store
        self.registry_root = self.runtime.registry.root

    async def close(self) -> None:
        if self.runtime is not None:
            await self.runtime.close()

    async def approve_new(self, n: int) -> list[int]:
        """`n` new approved corrections, stored as the bot stores an admin's approval."""
        ids = []
        for _ in range(n):
            self.asked += 1
            ex = await self.store.log_exchange(
                user_id=7, prompt_messages=[{"role": "user", "content": QUESTION}],
                answer="Berlin.", status="complete", answer_message_ids=[10_000 + self.asked])
            cid = await self.store.add_correction(ex, 7, CORRECTION)
            await self.store.set_correction_status(cid, "approved", 1)
            ids.append(cid)
        return ids


TRAINER_PHASES = ("calibrate", "eval", "promote")  # round i kills the child of phase i % 3


async def trainer_round(lab: TrainerLab, r: int, rng: random.Random, tally: Tally) -> None:
    from bot.retrain import RunStatus
    from trainer.registry import Registry, RegistryError

    tally.rounds += 1
    await lab.approve_new(rng.randint(1, 2))
    waiting = {row["id"] for row in await lab.store.export_approved_corrections(only_untrained=True)}
    before = registry_state(lab.registry_root)
    phase = TRAINER_PHASES[r % len(TRAINER_PHASES)]
    after_steps = rng.randint(1, 6)  # calibrate: progress events seen before the kill
    seen = {"steps": 0}
    ready = asyncio.Event()

    async def on_progress(event: dict) -> None:
        kind_, stage = event.get("event"), event.get("stage")
        if kind_ == "progress" and stage == "calibrate" and (event.get("step") or 0) > 0:
            seen["steps"] += 1
        if ((phase == "calibrate" and seen["steps"] >= after_steps)
                or (phase == "eval" and kind_ == "phase" and event.get("phase") == "eval")
                or (phase == "promote" and kind_ == "done" and event.get("command") == "eval")):
            ready.set()

    retrain = asyncio.create_task(lab.runtime.retrain("manual", 1, on_progress))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({retrain, waiter}, timeout=RETRAIN_LIMIT_S, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if retrain in done:
        tally.notes.append(f"trainer: the retrain ended before the kill point ({retrain.result().status})")
        return
    pid = None
    for _ in range(400):  # the eval / promote child starts just after the event
        pid = find_child(("trainer", phase), lab.config)
        if pid is not None or retrain.done():
            break
        await asyncio.sleep(0.005)
    if pid is not None:
        # a random moment inside the phase: promote lasts well under a second, eval ~20 s
        await asyncio.sleep(rng.uniform(0.0, {"calibrate": 2.0, "eval": 8.0, "promote": 0.3}[phase]))
    if pid is None or not alive(pid):
        tally.notes.append(f"trainer: `trainer {phase}` had finished before the kill")
        await asyncio.wait_for(retrain, RETRAIN_LIMIT_S)
        return
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    tally.kills += 1
    try:
        result = await asyncio.wait_for(retrain, RECOVER_LIMIT_S)
    except asyncio.TimeoutError:
        tally.wedged.append(f"trainer: the retrain did not return {RECOVER_LIMIT_S:.0f} s after its trainer died")
        retrain.cancel()
        return
    tally.notes.append(f"trainer: killed `trainer {phase}` ({seen['steps']} calibrate step events seen); "
                       f"the retrain said: {result.message}")
    # The user's side: one sentence naming the kill, the live adapter unchanged (or, for a
    # promote killed after its pointer swap, the new version promoted and live).
    went_through = result.status == RunStatus.SUCCEEDED and phase == "promote"
    if went_through:
        tally.notes.append(f"trainer: the promote had swapped PROMOTED before it died: {result.version} is live")
    elif (result.status in (RunStatus.CRASHED, RunStatus.FAILED) and "killed by SIGKILL" in result.message
          and ("unchanged" in result.message or "still serving" in result.message)):
        tally.clear += 1
    else:
        tally.unclear.append(f"trainer: after the kill the retrain said {result.status}: {result.message!r}")
    # The next start-up check, then the registry as before (a killed eval or promote leaves its
    # candidate; a promote killed after its pointer swap has promoted it).
    try:
        t0 = time.perf_counter()
        Registry(lab.registry_root).check()
        tally.check_s.append(time.perf_counter() - t0)
    except RegistryError as exc:
        tally.wedged.append(f"trainer: the registry start-up check refuses: {exc}")
    problems = registry_problems(lab.registry_root, before, may_add=phase != "calibrate")
    now = registry_state(lab.registry_root)
    if went_through and now.promoted == result.version:
        problems = [p for p in problems if not p.startswith("PROMOTED is")]
    tally.lost += [f"trainer: {p}" for p in problems]
    served = lab.runtime.live.version
    if now.promoted != served:
        tally.wedged.append(f"trainer: the registry promotes {now.promoted} but the bot serves {served}")
    # The store: every approved correction still approved, none marked trained, no run left running.
    rows = {row["id"]: row for row in db_rows(lab.store.path, "SELECT id, status, trained_run_id FROM corrections")}
    for cid in waiting:
        row = rows.get(cid)
        if row is None or row["status"] != "approved" or (row["trained_run_id"] is not None and not went_through):
            tally.lost.append(f"trainer: correction #{cid} after the kill: {dict(row) if row else 'missing'}")
    running = db_rows(lab.store.path, "SELECT id FROM training_runs WHERE status = 'running'")
    if running:
        tally.wedged.append(f"trainer: runs left 'running': {[row['id'] for row in running]}")
    # Serving goes on with the live adapter.
    try:
        health = await lab.runtime.core.client.health()
        if served and served not in json.dumps(health.get("adapters", {})):
            tally.lost.append(f"trainer: the worker no longer serves {served}: {health.get('adapters')}")
    except ModelError as exc:
        tally.wedged.append(f"trainer: the worker stopped answering: {exc}")
    # Recovery: the same corrections retrain to the end (after a promote that went through,
    # a new one: the next round's).
    if went_through:
        tally.recover_s.append(time.monotonic() - killed)
        tally.ok += 1
        return
    try:
        again = await asyncio.wait_for(lab.runtime.retrain("manual", 1), RETRAIN_LIMIT_S)
    except Exception as exc:  # noqa: BLE001 - a refusal or a crash here is the finding
        tally.wedged.append(f"trainer: the re-run failed: {type(exc).__name__}: {exc}")
        return
    if again.status not in (RunStatus.SUCCEEDED, RunStatus.REJECTED):
        tally.wedged.append(f"trainer: the re-run ended {again.status}: {again.message}")
        return
    tally.recover_s.append(time.monotonic() - killed)
    tally.ok += 1
    tally.notes.append(f"trainer: re-run {again.status} ({again.version}) {time.monotonic() - killed:.0f} s "
                       f"after the kill")


# ---------------------------------------------------------------- adapters and refused (one serving worker)

ADAPTER_OPS_PER_ROUND = 8  # loads, replacements and unloads a round of `adapters` makes
REFUSED_BATCH = 8  # chats in flight while `refused` loads adapters the worker must refuse
IDLE_LIMIT_S = 60.0


class Served:
    """A worker on the tiny base serving "live" (adapter a) and, at times, "swap", over raw HTTP
    (every status and body seen as it is, not as a client library reads it)."""

    def __init__(self, base: Path, root: Path, tmp: Path):
        self.base, self.root, self.tmp = base, root, tmp
        self.key = new_worker_key()
        self.auth = {"Authorization": f"Bearer {self.key}"}
        self.proc: Optional[WorkerProcess] = None
        self.http: Optional[aiohttp.ClientSession] = None
        self.reference: dict[str, str] = {}  # adapter dir (or "base") -> its greedy answer, idle

    async def start(self) -> "Served":
        args = ["--model", str(self.base), "--served-model-name", "tiny", "--lora", f"live={self.root / 'a'}",
                "--adapter-root", str(self.root), "--cpu-threads", "1", "--max-batch-size", "8"]
        self.proc = await asyncio.to_thread(WorkerProcess(args, api_key=self.key,
                                                          log_path=self.tmp / "adapters-worker.log").start)
        self.http = aiohttp.ClientSession(headers=self.auth)
        return self

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            await asyncio.to_thread(self.proc.stop)

    async def post(self, path: str, body: dict) -> tuple[int, object]:
        async with self.http.post(self.proc.url + path, json=body,
                                  timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text

    async def load(self, name: str, adapter: Path, inplace: bool = True) -> tuple[int, object]:
        return await self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter),
                                                          "load_inplace": inplace})

    async def unload(self, name: str) -> tuple[int, object]:
        return await self.post("/v1/unload_lora_adapter", {"lora_name": name})

    async def health(self) -> dict:
        async with self.http.get(self.proc.url + "/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
            return await r.json()

    async def chat(self, model: str, stream: bool, max_tokens: int, ignore_eos: bool = False) -> tuple[int, str, str]:
        """(status, what went wrong with the answer's shape or "" if nothing, the text or the error message)."""
        body = {"model": model, "messages": ASK, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": ignore_eos, "stream": stream}
        async with self.http.post(self.proc.url + "/v1/chat/completions", json=body,
                                  timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)) as r:
            raw = await r.read()
            if r.status != 200:
                return r.status, error_shape_problem(raw), error_message(raw)
            return (200, *(stream_problem(raw, model) if stream else completion_problem(raw, model)))

    async def answer(self, model: str) -> str:
        status, problem, text = await self.chat(model, stream=False, max_tokens=16)
        return text if status == 200 and not problem else f"<{status} {problem or text}>"

    async def idle(self) -> dict:
        """/health once nothing runs or waits (or after IDLE_LIMIT_S)."""
        deadline = time.monotonic() + IDLE_LIMIT_S
        while True:
            h = await self.health()
            if not (h["running"] or h["queue_depth"] or h["active_requests"]) or time.monotonic() > deadline:
                return h
            await asyncio.sleep(0.1)


def error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")


def error_shape_problem(raw: bytes) -> str:
    """"" when `raw` is vLLM's error body ({"error": {"message", "type", "param", "code"}})."""
    try:
        err = json.loads(raw)["error"]
        ok = isinstance(err["message"], str) and isinstance(err["type"], str) and isinstance(err["code"], int)
    except (ValueError, KeyError, TypeError):
        ok = False
    return "" if ok else f"not the JSON error shape: {raw[:120]!r}"


def completion_problem(raw: bytes, model: str) -> tuple[str, str]:
    try:
        body = json.loads(raw)
        choice = body["choices"][0]
        text = choice["message"]["content"]
        good = (body["object"] == "chat.completion" and body["model"] == model and isinstance(text, str)
                and choice["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] >= 1)
    except (ValueError, KeyError, IndexError, TypeError):
        good, text = False, ""
    return ("" if good else f"not a chat.completion of {model}: {raw[:160]!r}"), text


def stream_problem(raw: bytes, model: str) -> tuple[str, str]:
    """SSE chunks of `model`, one finish_reason, then [DONE]."""
    events = [line[6:] for line in raw.decode("utf-8", "replace").split("\n") if line.startswith("data: ")]
    if not events or events[-1].strip() != "[DONE]":
        return f"a stream of {model} without [DONE]: {raw[-160:]!r}", ""
    parts, finished = [], 0
    for data in events[:-1]:
        try:
            chunk = json.loads(data)
        except ValueError:
            return f"a stream chunk that is not JSON: {data[:120]!r}", ""
        if "error" in chunk:
            return f"an error inside the stream: {data[:160]}", ""
        if chunk.get("object") != "chat.completion.chunk" or chunk.get("model") != model:
            return f"a chunk not of {model}: {data[:160]}", ""
        for choice in chunk.get("choices") or []:
            parts.append(choice.get("delta", {}).get("content") or "")
            finished += choice.get("finish_reason") is not None
    return ("" if finished == 1 else f"a stream of {model} with {finished} finish reasons"), "".join(parts)


def broken_adapters(good: Path, root: Path) -> dict[str, Path]:
    """Copies of `good`, each with one thing the worker must refuse."""
    from safetensors.torch import load_file, save_file

    out = {}

    def copy(name: str) -> Path:
        shutil.copytree(good, root / name, dirs_exist_ok=True)
        out[name] = root / name
        return root / name

    config = json.loads((good / "adapter_config.json").read_text())
    (copy("modules-to-save") / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    (copy("rank-mismatch") / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))
    (copy("deep-config") / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    weights = copy("nan-weight") / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[next(iter(tensors))][0, 0] = float("nan")
    save_file(tensors, weights)
    weights = copy("truncated") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out


def adapter_lab(base: Path, tmp: Path) -> tuple[Path, dict[str, Path]]:
    """Three good adapters (a, b, c: random weights, each answering its own way) and the broken ones."""
    root = tmp / "adapter-lab"
    for name, seed in (("a", 11), ("b", 12), ("c", 13)):
        make_adapter(base, root / name, seed=seed)
    return root, broken_adapters(root / "a", root)


async def references(served: Served, tally: Tally) -> None:
    """The greedy answer of the base and of each good adapter, asked alone on an idle worker."""
    served.reference["base"] = await served.answer("tiny")
    for name in ("a", "b", "c"):
        await served.load("ref", served.root / name)
        served.reference[name] = await served.answer("ref")
    await served.unload("ref")
    tally.notes.append("adapters: greedy answers before any churn (each round ends checking them): "
                       + "; ".join(f"{k}: {v!r}" for k, v in served.reference.items()))
    if len(set(served.reference.values())) < len(served.reference):
        tally.notes.append("adapters: two of those answers are equal, so a swap between them goes unseen")


async def after_round(served: Served, live: Path, swap: Optional[Path], tally: Tally, what: str) -> None:
    """Idle: no adapter request held; the base, "live" and "swap" answer as their weights do."""
    try:
        h = await served.idle()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        tally.wedged.append(f"{what}: the worker stopped answering /health: {exc}")
        return
    held = {k: v for k, v in (h.get("adapter_requests") or {}).items() if v}
    if held or h["running"] or h["queue_depth"] or h["active_requests"]:
        tally.wedged.append(f"{what}: idle, yet held {held}, running {h['running']}, waiting {h['queue_depth']}, "
                            f"active {h['active_requests']}")
    if h.get("status") != "ok":
        tally.wedged.append(f"{what}: /health says {h.get('status')}")
    expect = {"tiny": "base", "live": live.name, **({"swap": swap.name} if swap else {})}
    for model, weights in expect.items():
        got = await served.answer(model)
        if got != served.reference[weights]:
            tally.lost.append(f"{what}: {model} answers {got!r}, its weights ({weights}) answer "
                              f"{served.reference[weights]!r}")


async def chat_loop(served: Served, rng: random.Random, stop: asyncio.Event, tally: Tally, what: str,
                    may_be_gone: tuple[str, ...] = ()) -> None:
    """Chats until `stop`; a model in `may_be_gone` may answer 404 (clear)."""
    models = ["tiny", "live", *may_be_gone]
    while not stop.is_set():
        model = rng.choice(models)
        try:
            status, problem, text = await served.chat(model, stream=rng.random() < 0.5, max_tokens=rng.randint(2, 16))
        except asyncio.TimeoutError:
            tally.wedged.append(f"{what}: a chat with {model} had no answer within {ANSWER_TIMEOUT_S:.0f} s")
            continue
        except aiohttp.ClientError as exc:
            tally.wedged.append(f"{what}: a chat with {model} broke: {type(exc).__name__}: {exc}")
            continue
        if status == 200 and not problem:
            tally.ok += 1
        elif status == 404 and model in may_be_gone and not problem:
            tally.clear += 1
        elif status == 429 and not problem:
            tally.clear += 1
            await asyncio.sleep(0.2)
        else:
            tally.lost.append(f"{what}: chat with {model} got {status}: {problem or text}"[:300])


async def adapters_round(served: Served, r: int, rng: random.Random, tally: Tally, state: dict) -> None:
    """Chats on base/live/swap while "swap" is loaded, replaced and unloaded and "live" replaced."""
    tally.rounds += 1
    what = f"adapters round {r}"
    stop = asyncio.Event()
    loops = [asyncio.create_task(chat_loop(served, rng, stop, tally, what, may_be_gone=("swap",)))
             for _ in range(CLIENT_LOOPS)]
    try:
        for _ in range(ADAPTER_OPS_PER_ROUND):
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            op = rng.choice(("load swap", "replace swap", "unload swap", "replace live"))
            if op == "unload swap":
                status, body = await served.unload("swap")
                ok, refused = status == 200, status in (404, 409)  # not loaded; or answering: retry later
                if ok:
                    state["swap"] = None
            elif op == "replace live":
                target = served.root / ("b" if state["live"].name == "a" else "a")
                status, body = await served.load("live", target)
                ok, refused = status == 200, False
                if ok:
                    state["live"] = target
            else:  # load swap (in place if it is there) or replace it with another directory
                now = state["swap"].name if state["swap"] else None
                target = served.root / rng.choice([n for n in ("b", "c") if n != now])
                status, body = await served.load("swap", target, inplace=op == "replace swap" or now is not None)
                ok, refused = status == 200, False
                if ok:
                    state["swap"] = target
            tally.kills += 1
            if refused and not error_shape_problem(json.dumps(body).encode()):
                tally.clear += 1
            elif not ok:
                tally.lost.append(f"{what}: {op} got {status}: {body}"[:300])
    finally:
        stop.set()
        await asyncio.gather(*loops)
    await after_round(served, state["live"], state["swap"], tally, what)


async def refused_round(served: Served, r: int, rng: random.Random, tally: Tally, broken: dict[str, Path]) -> None:
    """A mixed batch (base and live) in flight while broken adapters are loaded, new and in place of live."""
    tally.rounds += 1
    what = f"refused round {r}"
    live = served.root / "a"
    status, body = await served.load("live", live)  # whatever an earlier round left, live is a again
    if status != 200:
        tally.lost.append(f"{what}: reloading live got {status}: {body}")

    async def one(model: str, stream: bool) -> None:
        try:
            status, problem, text = await served.chat(model, stream, max_tokens=rng.randint(150, 300),
                                                      ignore_eos=True)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            tally.wedged.append(f"{what}: a chat with {model} had no answer: {type(exc).__name__}: {exc}")
            return
        if status == 200 and not problem:
            tally.ok += 1
        else:
            tally.lost.append(f"{what}: chat with {model} got {status}: {problem or text}"[:300])

    batch = [asyncio.create_task(one(rng.choice(("tiny", "live")), rng.random() < 0.5)) for _ in range(REFUSED_BATCH)]
    await asyncio.sleep(rng.uniform(0.0, 0.3))  # the batch runs for seconds: the loads land inside it
    for name in rng.sample(sorted(broken), len(broken)):
        if all(task.done() for task in batch):
            tally.notes.append(f"{what}: the batch had finished before loading {name}")
        inplace = rng.random() < 0.5
        try:
            status, body = await served.load("live" if inplace else f"bad-{name}", broken[name])
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            tally.wedged.append(f"{what}: loading {name} had no answer: {type(exc).__name__}: {exc}")
            continue
        tally.kills += 1
        shape = error_shape_problem(json.dumps(body).encode()) if isinstance(body, dict) else "not JSON"
        if status == 400 and not shape:
            tally.clear += 1
        else:
            tally.lost.append(f"{what}: loading {name} {'in place of live' if inplace else 'as a new name'} "
                              f"got {status}: {shape or body}"[:300])
    await asyncio.gather(*batch)
    await after_round(served, live, None, tally, what)
    async with served.http.get(served.proc.url + "/v1/models") as resp:
        listed = [m["id"] for m in (await resp.json())["data"]]
    if any(m.startswith("bad-") for m in listed):
        tally.lost.append(f"{what}: a refused adapter is listed: {listed}")


# ---------------------------------------------------------------- bot (the real `python -m bot`)


class BotGone(Exception):
    """The bot's stdout closed (it died) while we waited for a reply."""


class PipedBot:
    """`python -m bot` in terminal mode on a pipe: lines in, lines out, as a script drives it."""

    def __init__(self, config: Path, name: str, err_path: Path):
        self.config, self.name, self.err_path = config, name, err_path
        self.lines: list[str] = []
        self.proc: Optional[asyncio.subprocess.Process] = None
        self._reader: Optional[asyncio.Task] = None

    async def start(self) -> "PipedBot":
        env = {k: v for k, v in child_env().items() if k != "DISCORD_TOKEN"}
        with open(self.err_path, "ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "--config", str(self.config), cwd=ROOT, env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, line: str) -> int:
        """Send one input line; the index of the first output line that can answer it."""
        at = len(self.lines)
        try:
            self.proc.stdin.write((line + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BotGone("stdin closed") from exc
        return at

    async def expect(self, pattern: str, after: int, timeout: float) -> tuple[int, re.Match]:
        """The first output line from `after` on matching `pattern`: (its index, the match)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.lines)):
                m = rx.search(self.lines[i])
                if m:
                    return i, m
            if self._reader.done():
                raise BotGone(f"{pattern!r} not seen before the bot's output ended")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not seen in {timeout:.0f} s; last lines: {self.lines[-5:]}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def quit(self) -> int:
        """/quit, as a user leaves (the bot stops its worker); its exit status."""
        try:
            await self.send("/quit")
            self.proc.stdin.close()
            return await asyncio.wait_for(self.proc.wait(), BOT_REPLY_LIMIT_S)
        except (BotGone, asyncio.TimeoutError):
            self.kill()
            return await self.proc.wait()


@dataclass
class Acked:
    """What the bot confirmed to the user: flags given, corrections by id."""
    flags: int = 0
    corrections: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (text, status)


class BotLab:
    def __init__(self, config: Path, tmp: Path):
        from model.config import load_config

        self.config = config
        self.cfg = load_config(config)
        self.db = self.cfg.path(self.cfg.store.path)
        self.registry_root = self.cfg.path(self.cfg.training.registry_dir)
        self.tmp = tmp
        self.bot: Optional[PipedBot] = None
        self.acked = Acked()
        self.starts = 0

    @property
    def answer_rx(self) -> str:
        return rf"^{re.escape(self.cfg.identity.name)}> "

    async def start_bot(self, tally: Tally) -> Optional[PipedBot]:
        """Start the bot and wait for it to be ready, retrying a refused start (each refusal
        counted: clear if it said why in one line); None if it never started."""
        for attempt in range(RESTART_TRIES):
            self.starts += 1
            err_path = self.tmp / f"bot-stderr-{self.starts}.txt"
            bot = await PipedBot(self.config, self.cfg.identity.name, err_path).start()
            try:
                await bot.expect(r" is ready \(adapter ", 0, BOT_START_LIMIT_S)
                self.bot = bot
                return bot
            except (BotGone, TimeoutError) as exc:
                bot.kill()
                await bot.proc.wait()
                err = err_path.read_text(errors="replace").strip()
                if "another loopcord bot" in err:
                    tally.wedged.append(f"bot: start refused by a stale instance lock: {err[-200:]}")
                elif err.startswith("error:") and "\n" not in err:
                    tally.clear += 1
                    tally.notes.append(f"bot: start attempt {attempt + 1} refused: {err[-300:]}")
                else:
                    tally.unclear.append(f"bot: start failed unclearly ({exc}): {err[-300:]}")
            await asyncio.sleep(RESTART_PAUSE_S)
        tally.wedged.append(f"bot: did not start in {RESTART_TRIES} attempts")
        return None

    async def ask(self, question: str) -> None:
        at = await self.bot.send(question)
        await self.bot.expect(self.answer_rx, at, BOT_REPLY_LIMIT_S)

    async def drive(self) -> None:
        """Chat, flag, correct and approve until the bot dies; acknowledged writes are recorded."""
        while True:
            at = await self.bot.send("/new")  # each question asked afresh, as the gate asks it
            await self.bot.expect(r"^New conversation\.", at, BOT_REPLY_LIMIT_S)
            await self.ask(QUESTION)
            at = await self.bot.send("/flag")
            await self.bot.expect(r"^Flagged\.", at, BOT_REPLY_LIMIT_S)
            self.acked.flags += 1
            text = CORRECTION
            at = await self.bot.send(f"/correct {text}")
            _, m = await self.bot.expect(r"^Correction #(\d+) saved as (\w+)", at, BOT_REPLY_LIMIT_S)
            cid = int(m.group(1))
            self.acked.corrections[cid] = (text, m.group(2))
            at = await self.bot.send(f"/approve {cid}")
            await self.bot.expect(rf"^Correction #{cid} approved", at, BOT_REPLY_LIMIT_S)
            self.acked.corrections[cid] = (text, "approved")

    def check_store(self, tally: Tally) -> None:
        """Every acknowledged flag and correction is in the database as acknowledged."""
        # one flag per answer (the last one), and nothing else flags: count them
        (flagged,) = db_rows(self.db, "SELECT COUNT(*) FROM flags WHERE kind = 'bad' AND user_id = 0")[0]
        if flagged < self.acked.flags:
            tally.lost.append(f"bot: {self.acked.flags} flags acknowledged, {flagged} in the database")
        rows = {r["id"]: r for r in db_rows(self.db, "SELECT id, text, status FROM corrections")}
        for cid, (text, status) in self.acked.corrections.items():
            row = rows.get(cid)
            # an approval sent but not yet acknowledged when the bot died may have landed
            allowed = ("pending", "approved") if status == "pending" else (status,)
            if row is None or row["text"] != text or row["status"] not in allowed:
                tally.lost.append(f"bot: acknowledged correction #{cid} ({status}) is {dict(row) if row else 'missing'}")
        tally.ok = self.acked.flags + len(self.acked.corrections)  # all checked again every round


class BotKill(StrEnum):
    """Where a bot round's SIGKILL lands."""
    DRIVE = "while chatting, flagging and correcting"  # anywhere in the drive loop
    ANSWER = "while it streamed an answer"  # just after a question was sent
    RETRAIN = "while its retrain was training"  # the trainer child mid-calibrate


async def bot_round(lab: BotLab, r: int, moment: BotKill, rng: random.Random, tally: Tally) -> None:
    tally.rounds += 1
    if lab.bot is None and await lab.start_bot(tally) is None:
        return
    before = registry_state(lab.registry_root)
    bot = lab.bot
    retrain_kill = False
    try:
        if moment == BotKill.RETRAIN:
            await asyncio.wait_for(drive_n(lab, 1), 120)
            at = await bot.send("/retrain")
            await bot.expect(r"^Retraining on \d+ approved", at, BOT_REPLY_LIMIT_S)
            await bot.expect(r"🛠️ calibrate: \d+ steps", at, RETRAIN_LIMIT_S)  # training has begun
            await asyncio.sleep(rng.uniform(0.3, 4.0))
            retrain_kill = find_child(("trainer", "calibrate"), lab.config) is not None
        else:
            try:
                await asyncio.wait_for(lab.drive(), rng.uniform(2.0, 12.0))
            except asyncio.TimeoutError:
                pass  # the kill lands wherever the drive is
            if moment == BotKill.ANSWER:
                await asyncio.sleep(1.0)  # the drive's last line answered
                await bot.send(QUESTION)
                await asyncio.sleep(rng.uniform(0.0, 0.1))
    except (BotGone, TimeoutError) as exc:
        tally.unclear.append(f"bot: before the kill: {exc}")
    children = {pid: cmdline(pid) for pid in descendants(bot.pid)}
    bot.kill()
    killed = time.monotonic()
    tally.kills += 1
    await bot.proc.wait()
    lab.bot = None
    unclear_lines(bot, tally)
    # Restart at once (as a service manager would); meanwhile the dead bot's children must go.
    gone_after: dict[str, float] = {}
    orphans = asyncio.create_task(outlived(children, ORPHAN_GRACE_S, gone_after))
    restarted = await lab.start_bot(tally)
    tally.orphans += await orphans
    tally.notes.append(f"bot: round {r}: killed the bot {moment}" + ("" if retrain_kill or moment != BotKill.RETRAIN
                                                                      else " (the trainer had ended)")
                       + "; its children exited after " + (", ".join(f"{k} {s:.1f} s" for k, s in sorted(gone_after.items()))
                                                          or "none"))
    if restarted is None:
        return
    try:
        await lab.ask(QUESTION)
    except (BotGone, TimeoutError) as exc:
        tally.wedged.append(f"bot: the restarted bot does not answer: {exc}")
        return
    tally.recover_s.append(time.monotonic() - killed)
    lab.check_store(tally)
    tally.lost += [f"bot: {p}" for p in registry_problems(lab.registry_root, before, may_add=retrain_kill)]
    if retrain_kill:
        await retrain_after_kill(lab, tally)


def unclear_lines(bot: PipedBot, tally: Tally) -> None:
    """Lines the bot showed its user that are not worded messages (tracebacks, bare errors)."""
    tally.unclear += [f"bot: said {line!r}" for line in bot.lines if UNCLEAR_OUTPUT.search(line)][:3]


async def drive_n(lab: BotLab, n: int) -> None:
    """Drive until `n` more corrections are approved."""
    goal = sum(1 for t, s in lab.acked.corrections.values() if s == "approved") + n
    task = asyncio.create_task(lab.drive())
    while sum(1 for t, s in lab.acked.corrections.values() if s == "approved") < goal and not task.done():
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # The drive may have sent a line the bot is still answering: let it answer.
    await asyncio.sleep(1.0)


async def retrain_after_kill(lab: BotLab, tally: Tally) -> None:
    """After a kill mid-retrain: nothing was marked trained, and a new /retrain runs to the end."""
    approved = [cid for cid, (_, s) in lab.acked.corrections.items() if s == "approved"]
    rows = {r["id"]: r for r in db_rows(lab.db, "SELECT id, status, trained_run_id FROM corrections")}
    for cid in approved:
        if rows.get(cid) is None or rows[cid]["trained_run_id"] is not None:
            tally.lost.append(f"bot: correction #{cid} marked trained by a retrain that was killed")
    bot = lab.bot
    at = await bot.send("/retrain")
    try:
        i, _ = await bot.expect(r"^Retraining on \d+ approved|already running|Nothing new|needs attention",
                                at, BOT_REPLY_LIMIT_S)
        if not bot.lines[i].startswith("Retraining on"):
            tally.wedged.append(f"bot: /retrain after the restart: {bot.lines[i]!r}")
            return
        # the result's own line, not the gate summary before it ("Gate for v0002 vs v0001: failed ❌")
        i, _ = await bot.expect(r"^(?!Gate for |[✅❌] ).*(is now live|did not pass the gate|could not be|stopped before"
                                r"|failed)", at, RETRAIN_LIMIT_S)
    except (BotGone, TimeoutError) as exc:
        tally.wedged.append(f"bot: /retrain after the restart did not finish: {exc}")
        return
    if "is now live" in bot.lines[i] or "did not pass the gate" in bot.lines[i]:
        tally.notes.append(f"bot: /retrain after the restart: {bot.lines[i]}")
    else:
        tally.wedged.append(f"bot: /retrain after the restart: {bot.lines[i]!r}")


# ---------------------------------------------------------------- main


def summary(name: str, t: Tally) -> list:
    rec = sorted(t.recover_s)
    med = f"{statistics.median(rec):.1f}" if rec else "-"
    worst = f"{rec[-1]:.1f}" if rec else "-"
    return [name, f"{t.kills}/{t.rounds}", t.ok, t.clear, len(t.unclear), len(t.lost), len(t.wedged),
            len(t.orphans), med, worst]


async def run_targets(args, base: Path, tmp: Path, tallies: dict[str, Tally]) -> None:
    rng = random.Random(args.seed)
    seed_adapter = make_adapter(base, tmp / "seed-lora", seed=0, random_init=False)
    live = None
    if "worker" in tallies:
        config = lab_config(tmp / "worker-lab", base, args.calibrate_steps)
        version = seed_registry(config, make_adapter(base, tmp / "cand0", seed=1))
        from model.config import load_config
        from trainer.registry import Registry

        live = Registry.from_config(load_config(config)).path(version)
        for r in range(args.rounds):
            print(f"worker round {r + 1}/{args.rounds}", flush=True)
            await worker_round(base, live, rng, tallies["worker"], tmp)
    if "trainer" in tallies:
        config = lab_config(tmp / "trainer-lab", base, args.calibrate_steps)
        seed_registry(config, seed_adapter)
        lab = TrainerLab(config)
        with stderr_to(tmp / "trainer-lab.log"):  # the worker child and the trainers log there
            await lab.start()
            try:
                for r in range(args.rounds):
                    print(f"trainer round {r + 1}/{args.rounds}", flush=True)
                    await trainer_round(lab, r, rng, tallies["trainer"])
            finally:
                await lab.close()
    if "bot" in tallies:
        config = lab_config(tmp / "bot-lab", base, args.calibrate_steps)
        seed_registry(config, seed_adapter)
        lab = BotLab(config, tmp)
        retrain_round = rng.randrange(args.rounds)
        try:
            others = iter([BotKill.DRIVE, BotKill.ANSWER] * args.rounds)
            for r in range(args.rounds):
                moment = BotKill.RETRAIN if r == retrain_round else next(others)
                print(f"bot round {r + 1}/{args.rounds}: kill {moment}", flush=True)
                await bot_round(lab, r + 1, moment, rng, tallies["bot"])
        finally:
            if lab.bot is not None:
                unclear_lines(lab.bot, tallies["bot"])
                code = await lab.bot.quit()
                if code != 0:
                    tallies["bot"].unclear.append(f"bot: /quit exited {code}")
    if "adapters" in tallies or "refused" in tallies:
        root, broken = adapter_lab(base, tmp)
        served = await Served(base, root, tmp).start()
        try:
            await references(served, tallies.get("adapters") or tallies["refused"])
            state = {"live": root / "a", "swap": None}
            for name in ("adapters", "refused"):
                for r in range(args.rounds if name in tallies else 0):
                    print(f"{name} round {r + 1}/{args.rounds}", flush=True)
                    if name == "adapters":
                        await adapters_round(served, r + 1, rng, tallies[name], state)
                    else:
                        await refused_round(served, r + 1, rng, tallies[name], broken)
        finally:
            await served.close()


FOUND = """Defects this bench found, fixed with a regression test each (tests/test_chaos.py):
a bot killed mid-retrain left its run "running" in the store, so every later /retrain was refused
for good ("A retrain is already running"): the next start records it as crashed; the bot's trainer
child trained on for nobody after its bot died: trainer children now die with the bot, as the worker
did; the retrain's message after a killed trainer quoted its last log line ("calibrate: 480 samples
({...})") instead of the cause: it now says the process was killed by SIGKILL; a promote killed
after its atomic pointer swap left PROMOTED naming the new version while the bot served the old one
until a restart: the retrainer now reads the registry and serves what it promotes; a killed trainer
is a zombie until init reaps it (in a container, maybe never), and the registry counted zombies as
live writers, so their staging dirs survived every start-up check: they are now cleaned."""


DISRUPTIONS = {"adapters": "adapter loads, replacements and unloads", "refused": "refused adapter loads"}


def reading(tallies: dict[str, Tally]) -> str:
    bad = {n: len(t.unclear) + len(t.lost) + len(t.wedged) + len(t.orphans) for n, t in tallies.items()}
    parts = []
    for n, t in tallies.items():
        if n in DISRUPTIONS:
            parts.append(f"{n}: {t.kills} {DISRUPTIONS[n]} under {t.ok} good answers, {bad[n]} problems")
            continue
        rec = sorted(t.recover_s)
        worst = f"{rec[-1]:.0f} s" if rec else "n/a"
        missed = f" ({t.rounds - t.kills} of {t.rounds} rounds ended before the kill)" if t.kills < t.rounds else ""
        parts.append(f"{n}: {t.kills} kills{missed}, {bad[n]} problems, worst recovery {worst}")
    verdict = ("Every kill and adapter change was survived: nothing acknowledged was lost, nothing was left wedged "
               "or running, and every failure a user saw was a worded message."
               if not any(bad.values()) else "Problems are listed below the table.")
    checks = [s for t in tallies.values() for s in t.check_s]
    repair = (f"; the registry's start-up check after a trainer kill took at most {max(checks) * 1000:.0f} ms"
              if checks else "")
    return (f"{'; '.join(parts)}. {verdict} Recovery time is start-up and redone work, not repair (a bot "
            "restart starts the worker and loads the model; a trainer kill's recovery is a whole re-run: "
            f"calibrate, gate, promote and hot-swap){repair}.")


async def main_async(args) -> int:
    base = Path(args.model) if args.model else default_base(args.base_steps)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"error: unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    tallies = {t: Tally() for t in TARGETS if t in targets}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-") as d:
        tmp = Path(d)
        logging.basicConfig(filename=tmp / "bench.log", level=logging.INFO)
        try:
            await run_targets(args, base, tmp, tallies)
        finally:
            for pid in descendants(os.getpid()):  # nothing of ours outlives the bench
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    wall = time.monotonic() - started
    problems = [f"- {msg}" for t in tallies.values() for msg in (t.unclear + t.lost + t.wedged + t.orphans)]
    notes = [f"- {msg}" for t in tallies.values() for msg in t.notes]
    legend = ("How to read it. worker: ok = good answers; clear failures = requests refused with the client's typed "
              "error while the worker was down; recover = kill to the next good answer (restart and model load "
              "included). trainer: the real retrain path (Runtime, store, worker) with its `trainer calibrate` or "
              "`trainer eval` or `trainer promote` child killed (in turn); ok = rounds that ended consistent and "
              "retrained (a re-run completed, or the killed promote had already swapped PROMOTED and its version "
              "went live); clear = retrains that named the kill in one sentence with the live adapter unchanged; "
              "lost = a promoted or earlier version changed, staging or "
              "temp files left after the start-up check, or an approved correction no longer approved or marked "
              "trained; recover = kill to the re-run's end. bot: `python -m bot` on a pipe, killed and restarted at "
              "once on the same data directory; ok = acknowledged flags and corrections (each checked in the "
              "database); orphans = worker or trainer children alive 15 s after their bot died; recover = kill to "
              "the restarted bot's first answer. adapters: one worker serving the base, \"live\" and \"swap\" to four "
              "client loops (streamed or not) while \"swap\" is loaded, replaced with another directory and unloaded "
              "and \"live\" replaced, at random moments; loads = those operations; ok = answers in vLLM's shape; "
              "clear = a 404 for \"swap\" while unloaded, a 409 for an unload while it answered, a 429. refused: a mixed "
              f"batch of {REFUSED_BATCH} base and \"live\" chats in flight while adapters the worker must refuse "
              "(modules_to_save, a NaN weight, a rank that does not fit, a truncated file, a config nested 100,000 deep) "
              "are loaded as new names and in place of \"live\"; clear = each refusal, a 400 in the JSON error shape. "
              "For both, lost = a 5xx, an answer not in the expected shape, a refused adapter that loaded, or, idle "
              "after each round, a greedy answer of the base, \"live\" or \"swap\" that is not what its weights answered "
              "before any churn; wedged = no answer within 60 s, or an adapter request still held when idle.")
    parts = dict(
        text=[f"`python benchmarks/chaos_bench.py --targets {','.join(tallies)} --rounds {args.rounds} "
              f"--seed {args.seed}` (tiny base, calibrate {args.calibrate_steps} steps, one SIGKILL per round at a "
              f"random moment; {wall:.0f} s wall on the shared machine)."],
        tables=[table(["target", "kills or loads/rounds", "ok", "clear failures", "unclear failures", "lost", "wedged",
                       "orphans", "recover median s", "recover worst s"],
                      [summary(n, t) for n, t in tallies.items()])],
        notes=[reading(tallies), legend, " ".join(FOUND.split("\n")),
               *(["Problems:", *problems] if problems else []), *(["Rounds:", *notes] if notes else [])])
    print(preview("chaos_bench", **parts))
    if not args.no_write:
        record("chaos_bench", **parts)
    return 0 if not problems else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--rounds", type=int, default=3, help="kills per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", help="base model dir (default: the test suite's cached tiny base)")
    parser.add_argument("--base-steps", type=int, default=150, help="pretraining steps if a tiny base must be built")
    parser.add_argument("--calibrate-steps", type=int, default=100, help="calibrate steps per retrain (tiny profile)")
    parser.add_argument("--no-write", action="store_true", help="print only, record nothing")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
