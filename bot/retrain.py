"""Retrain, gate, promote and hot-swap: the loop that makes corrections stick.

The bot never trains in its own process. A retrain exports the approved
corrections as JSONL, runs `python -m trainer calibrate --progress json` as a
child process (relaying its JSON-lines progress), then `python -m trainer eval`
(the gate). Only a version that passes is promoted in the registry and loaded
into the worker under the served alias (`/v1/load_lora_adapter`, in place), so
new requests see it at once. A failed gate, a crashed or killed trainer, or a
failed load leaves the registry's promoted version and the live adapter as they
were. Discord commands, the schedule and the terminal all call `Retrainer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Optional

from model.client import ModelClient, ModelError
from model.config import Config
from trainer import gate
from trainer.registry import Registry, RegistryError

log = logging.getLogger(__name__)

GATE_FAILED_EXIT = 3  # `python -m trainer eval` exit status when the gate rejects
TRAINER_TAIL_LINES = 20  # stderr lines kept for the report when the trainer fails

Progress = Callable[[dict], Awaitable[None]]


class RetrainRefused(Exception):
    """A retrain cannot start now; str() says why in words for the user."""


@dataclass
class RetrainResult:
    status: str  # succeeded | rejected | failed | crashed
    message: str  # one paragraph for the user
    version: Optional[str] = None
    report: Optional[dict] = None
    chart: Optional[Path] = None
    seconds: float = 0.0
    n_corrections: int = 0
    stderr_tail: list[str] = field(default_factory=list)


def format_progress(event: dict) -> str:
    """One human line for a trainer progress event (Discord edit / terminal)."""
    kind = event.get("event")
    if kind == "progress":
        parts = [f"🛠️ {event.get('stage', 'training')}: step {event.get('step', '?')}/{event.get('total', '?')}"]
        if event.get("loss") is not None:
            parts.append(f"loss {float(event['loss']):.3f}")
        if event.get("eta_s") is not None:
            parts.append(f"ETA {format_seconds(float(event['eta_s']))}")
        return " · ".join(parts)
    if kind == "phase":
        return f"🛠️ {event.get('message') or event.get('phase')}"
    if kind == "done":
        return f"✅ trained {event.get('version')}"
    if kind == "error":
        return f"❌ {event.get('message')}"
    return f"🛠️ {kind}"


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def summarize_report(report: dict) -> str:
    """The gate report (trainer.gate's eval.json) in a few lines of words."""
    lines = [f"Gate for {report.get('version')} vs {report.get('reference')}: "
             f"{'passed ✅' if report.get('passed') else 'failed ❌'}"]
    for check in report.get("checks") or []:
        mark = "✅" if check.get("passed") else "❌"
        lines.append(f"{mark} {check['name']}: {check['value']:.3f} (needs {check['op']} {check['limit']:.3f})")
    return "\n".join(lines)


class Retrainer:
    """Runs one retrain at a time and swaps the result into the worker."""

    def __init__(self, cfg: Config, store, client: ModelClient,
                 on_live_changed: Optional[Callable[[str], None]] = None,
                 on_pause: Optional[Callable[[bool], None]] = None):
        self.cfg = cfg
        self.store = store
        self.client = client
        self.registry = Registry(cfg.path(cfg.training.registry_dir))
        self.on_live_changed = on_live_changed
        self.on_pause = on_pause or (lambda paused: None)
        self._lock = asyncio.Lock()
        self._proc: Optional[asyncio.subprocess.Process] = None
        self.paused_worker = False  # true while gpu_policy=pause has the worker asleep

    @property
    def running(self) -> bool:
        return self._lock.locked()

    async def check_can_start(self) -> int:
        """Number of new approved corrections; raises RetrainRefused with the reason."""
        if self._lock.locked() or await self.store.running_run():
            raise RetrainRefused("A retrain is already running; wait for it to finish.")
        if self.registry.promoted() is None:
            raise RetrainRefused("No adapter is promoted yet: run `python -m trainer bootstrap` first.")
        new = await self.store.count_untrained_approved()
        if new == 0:
            raise RetrainRefused("Nothing new to learn: no approved corrections since the last retrain.")
        return new

    async def retrain(self, trigger: str, started_by: Optional[int], progress: Optional[Progress] = None) -> RetrainResult:
        """Export → calibrate → gate → promote → hot-swap. Raises RetrainRefused."""
        await self.check_can_start()
        async with self._lock:
            return await self._run(trigger, started_by, progress or _ignore)

    async def _run(self, trigger: str, started_by: Optional[int], progress: Progress) -> RetrainResult:
        started = time.monotonic()
        rows = await self.store.export_approved_corrections()
        parent = self.registry.promoted()
        run_id = await self.store.start_run(trigger=trigger, started_by=started_by, parent_version=parent, n_corrections=len(rows))
        run_dir = self.cfg.path(self.cfg.training.work_dir) / f"run-{run_id:05d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        corrections = run_dir / "corrections.jsonl"
        corrections.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        result = RetrainResult(status="crashed", message="", n_corrections=len(rows))
        try:
            await self._pause_worker()
            result = await self._train_gate_promote(corrections, progress, result)
        except asyncio.CancelledError:
            await self._kill_trainer()
            result.status, result.message = "crashed", "The retrain was cancelled; the live adapter is unchanged."
            raise
        except Exception as exc:  # anything unexpected: report it, keep serving what we had
            log.exception("retrain run %s failed", run_id)
            result.status, result.message = "crashed", f"The retrain failed unexpectedly ({exc}); the live adapter is unchanged."
        finally:
            await self._wake_worker()
            result.seconds = time.monotonic() - started
            await self.store.finish_run(run_id, status=result.status, version=result.version, report=result.report, message=result.message)
            if result.status in ("succeeded", "rejected"):
                # Consumed: a rejected run's corrections still ride along in every later
                # export, but they alone do not trigger another (scheduled) run.
                await self.store.mark_corrections_trained(run_id, [r["id"] for r in rows])
        return result

    async def _train_gate_promote(self, corrections: Path, progress: Progress, result: RetrainResult) -> RetrainResult:
        code, done, tail = await self._trainer(["calibrate", "--corrections", str(corrections), "--progress", "json"], progress)
        if code != 0 or not done:
            reason = (done or {}).get("message") or (tail[-1] if tail else f"exit status {code}")
            result.status, result.stderr_tail = "crashed", tail
            result.message = f"Training stopped before it finished ({reason}). The live adapter is unchanged."
            return result
        result.version = done["version"]
        await progress({"event": "phase", "phase": "eval", "message": f"evaluating {result.version} against {self.registry.promoted()}"})
        code, _, tail = await self._trainer(["eval", "--version", result.version, "--corrections", str(corrections)], progress)
        result.report = _load_report(self.registry.path(result.version))
        result.chart = _find_chart(self.registry.path(result.version))
        if code == GATE_FAILED_EXIT or (result.report and not result.report.get("passed", code == 0)):
            result.status = "rejected"
            result.message = f"{result.version} did not pass the gate, so the live adapter stays {self.registry.promoted()}."
            return result
        if code != 0:
            result.status, result.stderr_tail = "crashed", tail
            result.message = f"The evaluation of {result.version} failed ({tail[-1] if tail else code}); the live adapter is unchanged."
            return result
        previous = self.registry.promoted()
        self.registry.promote(result.version)  # the gate passed, so this cannot refuse
        try:
            await self.swap_in(result.version)
        except ModelError as exc:
            if previous:
                self.registry.rollback(to=previous)
            result.status = "failed"
            result.message = f"{result.version} passed the gate but could not be loaded into the worker ({exc.message}); still serving {previous}."
            return result
        log.info("promoted %s and hot-swapped it", result.version)
        result.status = "succeeded"
        result.message = f"{result.version} passed the gate and is now live."
        return result

    async def swap_in(self, version: str) -> None:
        """Load `version`'s adapter into the worker under the served alias."""
        await self.client.load_adapter(self.cfg.model.served_name, str(self.registry.path(version)))
        if self.on_live_changed:
            self.on_live_changed(version)

    async def rollback(self, to: Optional[str] = None) -> str:
        """Re-point the registry to `to` (default: the previous promoted) and hot-swap it."""
        if self._lock.locked():
            raise RetrainRefused("A retrain is running; roll back after it finishes.")
        current = self.registry.promoted()
        try:
            target = self.registry.rollback(to=to)
        except RegistryError as exc:
            raise RetrainRefused(str(exc)) from None
        try:
            await self.swap_in(target)
        except ModelError:
            if current:
                self.registry.rollback(to=current)
            raise
        return target

    async def _trainer(self, args: list[str], progress: Progress) -> tuple[int, Optional[dict], list[str]]:
        def started(proc: asyncio.subprocess.Process) -> None:
            self._proc = proc

        try:
            return await run_trainer(self.cfg, args, progress, on_start=started)
        finally:
            self._proc = None

    async def _kill_trainer(self) -> None:
        proc = self._proc
        if proc and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()

    async def _pause_worker(self) -> None:
        if self.cfg.training.gpu_policy == "pause":
            self.on_pause(True)  # tell users before the worker stops answering
            self.paused_worker = True
            await self.client.sleep()

    async def _wake_worker(self) -> None:
        if self.paused_worker:
            try:
                await self.client.wake_up()
            finally:
                self.paused_worker = False
                self.on_pause(False)


async def run_trainer(
    cfg: Config, args: list[str], on_event: Progress,
    on_start: Optional[Callable[[asyncio.subprocess.Process], None]] = None,
) -> tuple[int, Optional[dict], list[str]]:
    """Run `python -m trainer ARGS --config ...`; relay its JSON-lines events.

    Returns (exit code, the final done/error event, the last lines of stderr)."""
    cmd = [sys.executable, "-m", "trainer", *args]
    if cfg.source:
        cmd += ["--config", str(cfg.source)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, cwd=str(cfg.root), env=child_env(),
    )
    if on_start:
        on_start(proc)
    tail: list[str] = []
    final: dict = {}

    async def read_stdout():
        async for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # stdout carries JSON lines only; anything else is noise
            if not isinstance(event, dict):
                continue
            if event.get("event") in ("done", "error"):
                final.update(event)
            await on_event(event)

    async def read_stderr():
        async for raw in proc.stderr:
            tail.append(raw.decode("utf-8", "replace").rstrip())
            del tail[:-TRAINER_TAIL_LINES]

    await asyncio.gather(read_stdout(), read_stderr())
    code = await proc.wait()
    log.info("trainer %s exited %s", args[0], code)
    return code, (final or None), [t for t in tail if t.strip()]


def child_env() -> dict[str, str]:
    """Environment for `python -m trainer` children: they run in the config's directory
    (so relative paths agree with ours) and must import this checkout even when it is
    not pip-installed."""
    repo = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": repo + (os.pathsep + path if path else "")}


async def _ignore(_: dict) -> None:
    return None


def _load_report(version_dir: Path) -> Optional[dict]:
    f = version_dir / gate.REPORT_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None


def _find_chart(version_dir: Path) -> Optional[Path]:
    f = version_dir / gate.CHART_FILE
    return f if f.exists() else None
