"""The product assembled: core (store + model), retrainer, and the live adapter.

Discord (`discord_app.py`) and the terminal (`local.py`) both start a `Runtime`
and call the same operations, so the two behave alike. Start-up order:
1. Take the data directory's instance lock (one bot per `.loopcord/`) and read
   the registry (a PROMOTED naming a missing version stops the start; what a killed
   trainer left half-written is logged and shown in /status, never repaired here: the
   bot serves the promoted version as PROMOTED says, and `python -m trainer check`, or
   the next trainer run that trains or gates, repairs the rest). A run the
   last bot left "running" (it was killed mid-retrain) is recorded as crashed, and an
   outside server that run had put to sleep (`gpu_policy: pause`) is woken.
2. With no base model configured and nothing promoted yet, prepare the embedded
   default and its identity adapter (`python -m trainer bootstrap`: SmolLM2 converted once, then one
   anchor stage with the cpu-small profile; minutes on a CPU).
3. Start (or reach) the model worker; the worker child loads the live adapter
   under the served alias at every (re)start.
4. With an external server (`model.url`), load the live adapter into it.

The Runtime is the one owner of which adapter is live (`self.live`): set from the
registry at start and by the retrainer at every swap-in and rollback; the core
reads it for every answer, /status shows it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Awaitable, Callable, Optional, TextIO

from model.client import ModelError
from model.config import Config
from trainer.protocol import Command, ExitCode, ProgressEvent, now_iso, parse_event
from trainer.registry import Registry, RegistryError

from bot import admin
from bot.core import MSG_RETRAINING, Core, LiveAdapter
from bot.retrain import Progress, Retrainer, RetrainResult, format_progress, run_trainer
from bot.supervisor import WorkerStartError

log = logging.getLogger(__name__)

Say = Callable[[str], Awaitable[None]]
BOOTSTRAP_REPORT_S = 10.0  # first-run progress: one line per stage, then at most one per this
INSTANCE_LOCK_FILE = "bot.lock"
REPAIR_HINT = "`python -m trainer check` repairs it"


class BootstrapError(RuntimeError):
    """The first-run build of the demo model failed; the message says why."""


class StartupError(WorkerStartError):
    """The bot cannot start (another instance, a broken registry); the message says what to do."""


class InstanceLock:
    """One bot per data directory: an flock held for the bot's lifetime (released by the
    kernel if the bot dies, so a crash never leaves a stale lock behind)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / INSTANCE_LOCK_FILE
        self._fh: Optional[TextIO] = None

    def acquire(self) -> "InstanceLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise StartupError(f"another loopcord bot (pid {holder}) is already running on {self.path.parent}; "
                               "stop it first, or give this one its own data directory (store.path)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None


def needs_bootstrap(cfg: Config, registry: Registry) -> bool:
    """Only the embedded demo base is built automatically (never a 7B training run)."""
    return not cfg.model.base and not cfg.model.url and registry.promoted() is None


async def bootstrap(cfg: Config, say: Say, progress: Optional[Progress] = None) -> None:
    """Run `python -m trainer bootstrap`, relaying its progress: every event to `progress`
    when given (the terminal draws a live bar), else a line per stage, then at most one per
    BOOTSTRAP_REPORT_S (minutes of silence look like a hang)."""
    last = {"stage": None, "at": 0.0}

    async def relay(event: dict) -> None:
        if progress is not None:
            await progress(event)
            return
        parsed, now = parse_event(event), time.monotonic()
        if isinstance(parsed, ProgressEvent) and (parsed.stage != last["stage"]
                                                  or now - last["at"] >= BOOTSTRAP_REPORT_S):
            last.update(stage=parsed.stage, at=now)
            await say(format_progress(event))

    outcome = await run_trainer(cfg, [Command.BOOTSTRAP, "--progress", "json"], relay)
    if outcome.exit_code != ExitCode.OK or not outcome.ok:
        raise BootstrapError(f"building the demo model failed: {outcome.reason}")


class Runtime:
    """Everything a front-end needs, started in order and closed in reverse."""

    def __init__(self, cfg: Config, registry: Registry, lock: Optional[InstanceLock] = None):
        self.cfg = cfg
        self.registry = registry
        self.lock = lock
        self.live = live_from_registry(registry)
        self.core: Optional[Core] = None
        self.retrainer: Optional[Retrainer] = None
        self._reload: Optional[asyncio.Task] = None

    @classmethod
    async def start(cls, cfg: Config, say: Optional[Say] = None, worker_port: Optional[int] = None,
                    progress: Optional[Progress] = None) -> "Runtime":
        say = say or _log_say
        lock = InstanceLock(data_dir(cfg)).acquire()
        runtime: Optional[Runtime] = None
        try:
            registry = Registry.from_config(cfg)
            try:
                for problem in registry.problems():
                    log.warning("adapter registry: %s (serving what PROMOTED says; %s)", problem, REPAIR_HINT)
                if needs_bootstrap(cfg, registry):
                    await say("First run: preparing SmolLM2 and training its identity adapter (minutes on a CPU; once only)…")
                    await bootstrap(cfg, say, progress)
                runtime = cls(cfg, registry, lock)
            except RegistryError as exc:
                raise StartupError(f"the adapter registry is not usable: {exc}") from None
            runtime.core = await Core.create(cfg, worker_port=worker_port, adapters=runtime.worker_adapters)
            await runtime.core.memory.start()
            runtime.core.live = lambda: runtime.live
            runtime.core.on_adapter_missing = runtime._adapter_missing
            runtime.retrainer = Retrainer(cfg, runtime.core.store, runtime.core.client,
                                          on_live_changed=runtime._live_changed, on_pause=runtime._paused)
            for run_id in await runtime.retrainer.close_interrupted_runs():  # we hold the instance lock
                log.warning("training run %s was interrupted when the bot last stopped; recorded as crashed", run_id)
            if cfg.model.url and cfg.training.gpu_policy == "pause":
                await runtime.retrainer.wake_outside_server()  # a bot killed mid-retrain left it asleep
            if cfg.model.url and runtime.live.version:
                await runtime.retrainer.swap_in(runtime.live.version)  # an external server starts without it
        except BaseException:
            if runtime is not None and runtime.core is not None:
                await runtime.core.close()
            lock.release()
            raise
        return runtime

    def worker_adapters(self) -> dict[str, str]:
        """What the worker child loads at each (re)start: the live adapter under the served alias."""
        return {self.cfg.model.served_name: str(self.live.path)} if self.live.version else {}

    def _adapter_missing(self) -> None:
        """The server lost the live adapter (a vLLM restart): load it again, once at a time."""
        if self.live.version and (self._reload is None or self._reload.done()):
            self._reload = asyncio.create_task(self._reload_live(), name="reload-live-adapter")

    async def _reload_live(self) -> None:
        version, path = self.live.version, self.live.path
        try:
            await self.core.client.load_adapter(self.cfg.model.served_name, str(path))
            log.warning("the model server had lost adapter %s; loaded it again", version)
        except ModelError as exc:
            log.error("reloading adapter %s into the model server failed: %s", version, exc.message)

    def _live_changed(self, version: str) -> None:
        self.live = LiveAdapter(version, self.registry.path(version), now_iso())

    def _paused(self, paused: bool) -> None:
        self.core.paused_notice = MSG_RETRAINING if paused else None

    async def status(self) -> str:
        report = await admin.status_report(self.cfg, self.core.store, self.core.client, self.retrainer, self.live,
                                           self.registry, self.core.memory)
        notice = registry_notice(self.registry)
        return f"{report}\n{notice}" if notice else report

    async def rollback(self, to: Optional[str] = None) -> str:
        version = await self.retrainer.rollback(to)
        return f"Rolled back: {version} is live again."

    async def retrain(self, trigger: str, started_by: Optional[int], progress=None) -> RetrainResult:
        return await self.retrainer.retrain(trigger, started_by, progress)

    async def close(self) -> None:
        if self._reload is not None and not self._reload.done():
            self._reload.cancel()
        try:
            if self.core is not None:
                await self.core.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def data_dir(cfg: Config) -> Path:
    """The bot's data directory: where its store lives (`.loopcord/` by default)."""
    return cfg.path(cfg.store.path).parent


def registry_notice(registry: Registry) -> Optional[str]:
    """The /status line for what a killed trainer run left in the registry (None: nothing). Read
    only: the bot never writes the registry."""
    try:
        problems = registry.problems()
    except RegistryError as exc:
        problems = [str(exc)]
    if not problems:
        return None
    return f"**Registry:** ⚠️ {'; '.join(problems)} ({REPAIR_HINT})"


def live_from_registry(registry: Registry) -> LiveAdapter:
    version = registry.promoted()
    if not version:
        return LiveAdapter()
    return LiveAdapter(version, registry.path(version), registry.live_since())


async def _log_say(text: str) -> None:
    log.info("%s", text)
