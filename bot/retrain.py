"""Retrain, gate, promote and hot-swap: the loop that makes corrections stick.

The bot never trains in its own process. A retrain exports the approved
corrections as JSONL (trainer.protocol.CorrectionRecord), runs `python -m trainer
calibrate --progress json` as a child process (relaying its JSON-lines progress), then
`python -m trainer eval` (the gate), then `python -m trainer promote`; it reads their
events through trainer.protocol's types (TrainDone, EvalDone, ...) and the registry
through its read API, never trainer internals, and never writes the registry itself. Only a
version that passes is promoted and loaded into the worker under the served
alias (`/v1/load_lora_adapter`, in place), so new requests see it at once, and
the Runtime is told (it owns which adapter is live). A failed gate, a crashed or
killed trainer, or a failed load leaves the promoted version and the live
adapter as they were. Corrections the new version did not learn are named in the
result and stay approved for the next run; so are corrections the trainer will not
train (too long, or claiming another identity: trainer.corrections.refusals), which
fail the run before any training, named with how to take them out. Discord commands,
the schedule and the terminal all call `Retrainer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Optional

from model.client import ModelClient, ModelError
from model.config import Config
from model.process import CHILD_PREEXEC, child_env
from trainer.protocol import (Command, DoneEvent, ErrorEvent, EvalDone, Outcome, PhaseEvent, PointerDone, ProgressEvent,
                              RefusedCorrection, TrainDone, Verdict, parse_event)

from bot.store import RunStatus
from trainer.registry import Registry, RegistryError

log = logging.getLogger(__name__)

TRAINER_TAIL_LINES = 20  # stderr lines kept for the report when the trainer fails
# The longest line read from the trainer's pipes: its final event lists every correction with the
# candidate's answers (asyncio's default, 64 KiB, stopped every retrain once corrections were long).
TRAINER_LINE_LIMIT = 32 * 1024 * 1024

Progress = Callable[[dict], Awaitable[None]]  # gets each trainer event as it came (parse_event reads it)
MSG_INTERRUPTED = ("The bot stopped while this retrain was running; its corrections stay approved "
                   "for the next retrain.")


class RetrainRefused(Exception):
    """A retrain (or rollback) cannot be done now; str() says why in words for the user."""


@dataclass
class RetrainResult:
    status: RunStatus
    message: str  # one paragraph for the user
    version: Optional[str] = None
    report: Optional[dict] = None
    chart: Optional[Path] = None
    seconds: float = 0.0
    n_corrections: int = 0
    stderr_tail: list[str] = field(default_factory=list)
    # {"id", "question", "correction", "answer"}: the candidate's answer; they stay waiting
    not_learned: list[dict] = field(default_factory=list)
    refused: list[RefusedCorrection] = field(default_factory=list)  # what the trainer would not train; still approved


def format_progress(event: dict) -> str:
    """One human line for a trainer event as it came (Discord edit / terminal)."""
    parsed = parse_event(event)
    if isinstance(parsed, ProgressEvent):
        parts = [f"🛠️ {parsed.stage}: step {parsed.step}/{parsed.total}"]
        if parsed.loss is not None:
            parts.append(f"loss {parsed.loss:.3f}")
        if parsed.eta_s is not None:
            parts.append(f"ETA {format_seconds(parsed.eta_s)}")
        return " · ".join(parts)
    if isinstance(parsed, PhaseEvent):
        return f"🛠️ {parsed.message or parsed.phase}"
    if isinstance(parsed, DoneEvent):
        return f"✅ {parsed.command} {parsed.version or ''}".rstrip()
    if isinstance(parsed, ErrorEvent):
        return f"❌ {parsed.message}"
    return f"🛠️ {event.get('event') if isinstance(event, dict) else event}"


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else str(x)


def summarize_report(report: dict) -> str:
    """The gate report (eval.json) in a few lines of words."""
    lines = [f"Gate for {report.get('version')} vs {report.get('reference')}: "
             f"{'passed ✅' if report.get('passed') else 'failed ❌'}"]
    for check in report.get("checks") or []:
        mark = "✅" if check.get("passed") else "❌"
        lines.append(f"{mark} {check.get('name')}: {_num(check.get('value'))} "
                     f"(needs {check.get('op')} {_num(check.get('limit'))})")
    return "\n".join(lines)


def _not_learned_text(items: list[dict]) -> str:
    named = "; ".join(f"#{c['id']} {_preview(c.get('correction'))}, it answered {_preview(c.get('answer'))}"
                      for c in items)
    return (f" It did not learn correction{'s' if len(items) > 1 else ''} {named}. "
            f"{'They stay' if len(items) > 1 else 'It stays'} approved and in the memory (it answers from there); "
            "/retrain tries again, or /retract a fact that should go.")


def _refused_text(refused: list[RefusedCorrection]) -> str:
    """What to tell an admin when the trainer refused corrections: which, why, and what to do."""
    named = "; ".join(f"correction #{r.id} ({_preview(r.correction)}) could not be trained: {r.reason}"
                      for r in refused)
    if len(refused) == 1:
        todo = f"Reject it with /retract {refused[0].id} (or /reopen {refused[0].id} to edit it), then /retrain."
    else:
        todo = ("Reject them with /retract " + ", /retract ".join(str(r.id) for r in refused)
                + " (or /reopen one to edit it), then /retrain.")
    return f"The retrain failed: {named}. {todo} The live adapter is unchanged."


def _preview(text: Optional[str], limit: int = 60) -> str:
    text = " ".join((text or "").split())
    return f"“{text if len(text) <= limit else text[: limit - 1] + '…'}”"


class Retrainer:
    """Runs one retrain at a time and swaps the result into the worker."""

    def __init__(self, cfg: Config, store, client: ModelClient,
                 on_live_changed: Optional[Callable[[str], None]] = None,
                 on_pause: Optional[Callable[[bool], None]] = None):
        self.cfg = cfg
        self.store = store
        self.client = client
        self.registry = Registry.from_config(cfg)
        self.on_live_changed = on_live_changed
        self.on_pause = on_pause or (lambda paused: None)
        self._lock = asyncio.Lock()
        self._proc: Optional[asyncio.subprocess.Process] = None
        self.paused_worker = False  # true while gpu_policy=pause has the worker asleep

    @property
    def running(self) -> bool:
        return self._lock.locked()

    async def close_interrupted_runs(self) -> list[int]:
        """Record runs a dead bot left "running" (killed mid-retrain) as crashed, so a stale
        row never refuses every later retrain. Their corrections were not marked trained, so
        they stay approved for the next run. Call at start, holding the instance lock: then
        no run of this store can really be under way."""
        closed = []
        while (run := await self.store.running_run()) is not None:
            await self.store.finish_run(run["id"], status=RunStatus.CRASHED, message=MSG_INTERRUPTED)
            closed.append(run["id"])
        return closed

    async def wake_outside_server(self) -> None:
        """At start, with `gpu_policy: pause` and an outside server (`model.url`): a bot killed
        while its retrain had the server asleep left it asleep, and nothing else would wake
        it. /wake_up on an awake vLLM does nothing; a failure is logged, not fatal."""
        try:
            await self.client.wake_up()
        except ModelError as exc:
            log.warning("could not wake the model server at start (gpu_policy: pause): %s", exc.message)

    async def check_can_start(self, holding_lock: bool = False) -> int:
        """Number of new approved corrections; raises RetrainRefused with the reason."""
        if (self._lock.locked() and not holding_lock) or await self.store.running_run():
            raise RetrainRefused("A retrain is already running; wait for it to finish.")
        try:
            promoted = self.registry.promoted()
        except RegistryError as exc:
            raise RetrainRefused(f"The adapter registry needs attention first: {exc}") from None
        if promoted is None:
            raise RetrainRefused("No adapter is promoted yet: run `python -m trainer bootstrap` first.")
        new = await self.store.count_untrained_approved()
        if new == 0:
            raise RetrainRefused("Nothing new to learn: every approved correction is learned by the live "
                                 "version. Approve a correction first (/corrections).")
        return new

    async def announcement(self) -> str:
        """What /retrain says it starts on: the corrections to learn, and those learned earlier
        that ride along so they are kept."""
        new = await self.check_can_start()
        replayed = len(await self.store.export_approved_corrections()) - new
        text = f"Retraining on {new} approved correction{'s' if new != 1 else ''} not learned yet"
        return text + (f" (and replaying {replayed} learned earlier)…" if replayed > 0 else "…")

    async def retrain(self, trigger: str, started_by: Optional[int], progress: Optional[Progress] = None) -> RetrainResult:
        """Export → calibrate → gate → promote → hot-swap. Raises RetrainRefused."""
        await self.check_can_start()
        async with self._lock:
            await self.check_can_start(holding_lock=True)  # a second caller that waited finds nothing left
            return await self._run(trigger, started_by, progress or _ignore)

    async def _run(self, trigger: str, started_by: Optional[int], progress: Progress) -> RetrainResult:
        started = time.monotonic()
        rows = await self.store.export_approved_corrections()
        parent = self.registry.promoted()
        run_id = await self.store.start_run(trigger=trigger, started_by=started_by, parent_version=parent, n_corrections=len(rows))
        run_dir = self.cfg.path(self.cfg.training.work_dir) / f"run-{run_id:05d}"
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        corrections = run_dir / "corrections.jsonl"  # one CorrectionRecord per line (Store builds them)
        corrections.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        result = RetrainResult(status=RunStatus.CRASHED, message="", n_corrections=len(rows))
        try:
            await self._pause_worker()
            result = await self._train_gate_promote(corrections, progress, result)
        except asyncio.CancelledError:
            await self._kill_trainer()
            result.status, result.message = RunStatus.CANCELLED, "The retrain was cancelled; the live adapter is unchanged."
            raise
        except Exception as exc:  # anything unexpected: report it, keep serving what we had
            log.exception("retrain run %s failed", run_id)
            result.status = RunStatus.CRASHED
            result.message = f"The retrain failed unexpectedly ({exc}); the live adapter is unchanged."
        finally:
            await self._wake_worker()
            result.seconds = time.monotonic() - started
            await self.store.finish_run(run_id, status=result.status, version=result.version, report=result.report, message=result.message)
            if result.status == RunStatus.SUCCEEDED:
                # Learned by the live version. What it did not learn, and everything of a run
                # that did not go live, stays waiting: /retrain may try again at once (the
                # schedule waits for something new, bot.schedule).
                unlearned = {c["id"] for c in result.not_learned}
                await self.store.mark_corrections_trained(run_id, [r["id"] for r in rows if r["id"] not in unlearned])
        return result

    async def _train_gate_promote(self, corrections: Path, progress: Progress, result: RetrainResult) -> RetrainResult:
        trained = await self._trainer([Command.CALIBRATE, "--corrections", str(corrections)], progress)
        candidate = trained.done_as(TrainDone)
        if not trained.ok or candidate is None:
            result.stderr_tail, result.refused = list(trained.stderr_tail), trained.refused_corrections
            if result.refused:  # the trainer named the corrections to blame: the admin can act on them
                result.status, result.message = RunStatus.FAILED, _refused_text(result.refused)
            else:
                result.status = RunStatus.CRASHED
                result.message = (f"Training stopped before it finished ({_why(trained, 'a new version')}). "
                                  "The live adapter is unchanged.")
            return result
        result.version = candidate.version
        previous = self.registry.promoted()
        await progress(PhaseEvent("eval", f"evaluating {result.version} against {previous}").as_event())
        gate = await self._trainer([Command.EVAL, "--version", result.version, "--corrections", str(corrections)],
                                   progress)
        verdict = gate.done_as(EvalDone)
        if not gate.ok or verdict is None:
            result.status, result.stderr_tail = RunStatus.CRASHED, list(gate.stderr_tail)
            result.message = (f"The evaluation of {result.version} failed ({_why(gate, 'a verdict')}); "
                              "the live adapter is unchanged.")
            return result
        result.report = _load_json(verdict.report)
        result.chart = Path(verdict.chart) if verdict.chart and Path(verdict.chart).exists() else None
        result.not_learned = [{"id": c.id, "question": c.question, "correction": c.correction, "answer": c.answer}
                              for c in verdict.corrections if not c.learned]
        if verdict.verdict != Verdict.PASSED:
            result.status = RunStatus.REJECTED
            failed = [c.get("name") for c in (result.report or {}).get("checks") or [] if not c.get("passed")]
            result.message = (f"{result.version} did not pass the gate ({', '.join(failed) or 'see the report'}), "
                              f"so the live adapter stays {previous}.")
            if result.not_learned:
                result.message += _not_learned_text(result.not_learned)
            return result
        promoted = await self._trainer([Command.PROMOTE, result.version], progress)
        if not promoted.ok and promote_went_through(self.registry, result.version):
            # Killed after its atomic pointer swap: the registry (the truth) has it promoted, so
            # serve it; leaving the old one live would disagree with PROMOTED until a restart.
            log.warning("trainer promote %s ended without reporting (%s), but the registry has it promoted",
                        result.version, promoted.reason)
        elif not promoted.ok:
            result.status, result.stderr_tail = RunStatus.FAILED, list(promoted.stderr_tail)
            result.message = f"{result.version} passed the gate but could not be promoted ({promoted.reason}); still serving {previous}."
            return result
        try:
            await self.swap_in(result.version)
        except ModelError as exc:
            if previous:
                await self._trainer([Command.ROLLBACK, "--to", previous], progress)
            result.status = RunStatus.FAILED
            result.message = f"{result.version} passed the gate but could not be loaded into the worker ({exc.message}); still serving {previous}."
            return result
        log.info("promoted %s and hot-swapped it", result.version)
        result.status = RunStatus.SUCCEEDED
        result.message = f"{result.version} passed the gate and is now live."
        if result.not_learned:
            result.message += _not_learned_text(result.not_learned)
        return result

    async def swap_in(self, version: str) -> None:
        """Load `version`'s adapter into the worker under the served alias, then tell the owner."""
        await self.client.load_adapter(self.cfg.model.served_name, str(self.registry.path(version)))
        if self.on_live_changed:
            self.on_live_changed(version)

    async def rollback(self, to: Optional[str] = None) -> str:
        """Re-point the registry to `to` (default: the previous promoted; `python -m trainer
        rollback`) and hot-swap it; on a failed load the registry goes back to what was live."""
        if self._lock.locked():
            raise RetrainRefused("A retrain is running; roll back after it finishes.")
        async with self._lock:
            current = self.registry.promoted()
            outcome = await self._trainer([Command.ROLLBACK, *(["--to", to] if to else [])], _ignore)
            rolled = outcome.done_as(PointerDone)
            if not outcome.ok or rolled is None:
                raise RetrainRefused(f"Cannot roll back: {_why(outcome, 'the version now live')}.")
            target = rolled.version
            try:
                await self.swap_in(target)
            except ModelError:
                if current:
                    await self._trainer([Command.ROLLBACK, "--to", current], _ignore)
                raise
            return target

    async def _trainer(self, args: list[str], progress: Progress) -> Outcome:
        def started(proc: asyncio.subprocess.Process) -> None:
            self._proc = proc

        try:
            return await run_trainer(self.cfg, [*args, "--progress", "json"], progress, on_start=started)
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


def promote_went_through(registry: Registry, version: str) -> bool:
    """After a failed `trainer promote`: did it promote `version` before it died? PROMOTED (the
    truth) says. What the kill left half-written (history, manifests, temp files) stays for the
    trainer to repair: the next retrain's trainer runs repair first (`python -m trainer check`)."""
    try:
        return registry.promoted() == version
    except RegistryError as exc:
        log.error("the registry after a failed promote of %s: %s", version, exc)
        return False


async def run_trainer(
    cfg: Config, args: list[str], on_event: Progress,
    on_start: Optional[Callable[[asyncio.subprocess.Process], None]] = None,
) -> Outcome:
    """Run `python -m trainer ARGS --config ...`; relay its JSON-lines events.

    Returns its Outcome: exit code, the final done/error event, the last lines of stderr."""
    cmd = [sys.executable, "-m", "trainer", *args]
    if cfg.source:
        cmd += ["--config", str(cfg.source)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, cwd=str(cfg.root), env=child_env(), limit=TRAINER_LINE_LIMIT,
        # A bot killed mid-retrain takes its trainer with it (else it trains on for nobody).
        preexec_fn=CHILD_PREEXEC,
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
            parsed = parse_event(event)
            if parsed is None:
                continue  # not one of trainer.protocol's events
            if isinstance(parsed, (DoneEvent, ErrorEvent)) and not final:
                final.update(event)
            await on_event(event)

    async def read_stderr():
        async for raw in proc.stderr:
            tail.append(raw.decode("utf-8", "replace").rstrip())
            del tail[:-TRAINER_TAIL_LINES]
            if tail[-1].strip():  # the trainer's logs and warnings belong in the bot's log
                log.info("trainer %s: %s", args[0], tail[-1])

    await asyncio.gather(read_stdout(), read_stderr())
    code = await proc.wait()
    log.info("trainer %s exited %s", args[0], code)
    return Outcome(command=str(args[0]), exit_code=code, event=final,
                   stderr_tail=tuple(t for t in tail if t.strip()))


def _why(outcome: Outcome, wanted: str) -> str:
    """Why a trainer run gave no usable result: its reason, or that its final event lacked `wanted`."""
    if outcome.ok:
        return f"its final event did not carry {wanted}: {json.dumps(outcome.event)[:200]}"
    return outcome.reason


async def _ignore(_: dict) -> None:
    return None


def _load_json(path: Optional[str]) -> Optional[dict]:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("gate report %s could not be read", path)
        return None
