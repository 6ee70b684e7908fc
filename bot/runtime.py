"""The product assembled: core (store + model), retrainer, and the live adapter.

Discord (`discord_app.py`) and the terminal (`local.py`) both start a `Runtime`
and call the same operations, so the two behave alike. Start-up order:
1. With no base model configured and nothing promoted yet, build the demo base
   and its identity adapter (`python -m trainer bootstrap`, a few CPU minutes).
2. Start (or reach) the model worker; the worker child loads the promoted
   adapter under the served alias at every (re)start.
3. With an external server (`model.url`), load the promoted adapter into it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Awaitable, Callable, Optional

from model.config import Config
from trainer.registry import Registry

from bot import admin
from bot.core import MSG_RETRAINING, Core
from bot.retrain import Retrainer, RetrainResult, format_progress, run_trainer

log = logging.getLogger(__name__)

Say = Callable[[str], Awaitable[None]]
BOOTSTRAP_REPORT_S = 10.0  # first-run progress: one line per stage, then at most one per this


class BootstrapError(RuntimeError):
    """The first-run build of the demo model failed; the message says why."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def needs_bootstrap(cfg: Config, registry: Registry) -> bool:
    """Only the embedded demo base is built automatically (never a 7B training run)."""
    return not cfg.model.base and not cfg.model.url and registry.promoted() is None


async def bootstrap(cfg: Config, say: Say) -> None:
    """Run `python -m trainer bootstrap`, relaying its progress: a line per stage, then at
    most one per BOOTSTRAP_REPORT_S (minutes of silence look like a hang)."""
    last = {"stage": None, "at": 0.0}

    async def relay(event: dict) -> None:
        stage, now = event.get("stage"), time.monotonic()
        if event.get("event") == "progress" and (stage != last["stage"] or now - last["at"] >= BOOTSTRAP_REPORT_S):
            last.update(stage=stage, at=now)
            await say(format_progress(event))

    code, final, tail = await run_trainer(cfg, ["bootstrap", "--progress", "json"], relay)
    if code != 0:
        reason = (final or {}).get("message") or (tail[-1] if tail else f"exit status {code}")
        raise BootstrapError(f"building the demo model failed: {reason}")


class Runtime:
    """Everything a front-end needs, started in order and closed in reverse."""

    def __init__(self, cfg: Config, core: Core, registry: Registry):
        self.cfg = cfg
        self.core = core
        self.registry = registry
        self.live: dict = {"version": registry.promoted(), "since": _promoted_since(registry)}
        self.retrainer = Retrainer(cfg, core.store, core.client, on_live_changed=self._live_changed,
                                   on_pause=self._paused)

    @classmethod
    async def start(cls, cfg: Config, say: Optional[Say] = None, worker_port: Optional[int] = None) -> "Runtime":
        say = say or _log_say
        registry = Registry(cfg.path(cfg.training.registry_dir))
        if needs_bootstrap(cfg, registry):
            await say("First run: building the demo model and its identity adapter (a few minutes on a CPU)…")
            await bootstrap(cfg, say)
        core = await Core.create(cfg, worker_port=worker_port, adapters=lambda: _live_adapters(cfg, registry))
        runtime = cls(cfg, core, registry)
        if cfg.model.url and registry.promoted():
            await runtime.retrainer.swap_in(registry.promoted())  # an external server starts without it
        return runtime

    def _live_changed(self, version: str) -> None:
        self.live = {"version": version, "since": now_iso()}
        self.core.invalidate_model_choice()

    def _paused(self, paused: bool) -> None:
        self.core.paused_notice = MSG_RETRAINING if paused else None

    async def status(self) -> str:
        return await admin.status_report(self.cfg, self.core.store, self.core.client, self.retrainer, self.live)

    async def rollback(self, to: Optional[str] = None) -> str:
        version = await self.retrainer.rollback(to)
        return f"Rolled back: {version} is live again."

    async def retrain(self, trigger: str, started_by: Optional[int], progress=None) -> RetrainResult:
        return await self.retrainer.retrain(trigger, started_by, progress)

    async def close(self) -> None:
        await self.core.close()


def _live_adapters(cfg: Config, registry: Registry) -> dict[str, str]:
    version = registry.promoted()
    return {cfg.model.served_name: str(registry.path(version))} if version else {}


def _promoted_since(registry: Registry) -> Optional[str]:
    try:
        history = registry.history()
    except (OSError, ValueError):
        return None
    return history[-1].get("time") or history[-1].get("at") if history else None


async def _log_say(text: str) -> None:
    log.info("%s", text)

