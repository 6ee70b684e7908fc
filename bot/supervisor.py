"""Run the model worker (`python -m model serve`) as the bot's child process.

Used when `model.url` is empty. The supervisor starts the worker, waits for
`/health` to report the model loaded, restarts it with exponential backoff if
it dies, and on shutdown sends SIGTERM (the worker drains in-flight requests)
then kills it if it does not exit in time. Users who ask while it is down get
told so by the core, which reads `state`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import aiohttp

from model.config import Config

log = logging.getLogger(__name__)

HEALTH_POLL_S = 0.5
RESTART_BACKOFF_START_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0  # a worker up this long resets the backoff
KILL_GRACE_EXTRA_S = 5.0  # on top of worker.drain_timeout_s before SIGKILL
_PR_SET_PDEATHSIG = 1


class WorkerStartError(RuntimeError):
    """The worker cannot be started; the message tells the user what to do."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # If the bot is killed hard, the kernel sends the worker SIGTERM too (Linux).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def worker_command(cfg: Config, model_path: Path, port: int,
                   adapters: Optional[dict[str, str]] = None) -> list[str]:
    cmd = [sys.executable, "-m", "model", "serve", "--model", str(model_path),
           "--host", cfg.worker.host, "--port", str(port)]
    if cfg.source is not None:
        cmd[4:4] = ["--config", str(cfg.source)]
    for name, path in (adapters or {}).items():
        cmd += ["--lora", f"{name}={path}"]
    return cmd


def resolve_model_path(cfg: Config) -> Path:
    """The base model directory the worker loads, or a WorkerStartError saying how to get one."""
    path = cfg.base_model_path()
    if not (path / "config.json").exists():
        if cfg.model.base:
            raise WorkerStartError(
                f"model.base is {cfg.model.base!r} but {path} holds no model (no config.json); "
                "point model.base at a Hugging Face model directory"
            )
        raise WorkerStartError(
            f"no base model at {path}: run `python -m trainer bootstrap` to build the demo "
            "model, or set model.base (or model.url for a running server) in the config"
        )
    return path


class WorkerSupervisor:
    """Owns the worker child process. `state` is one of: starting, ready, restarting, stopped."""

    def __init__(self, cfg: Config, port: Optional[int] = None,
                 adapters: Optional[Callable[[], dict[str, str]]] = None):
        self.cfg = cfg
        # Asked at every (re)start, so a restarted worker serves the adapter live *now*.
        self.adapters = adapters or (lambda: {})
        self.port = port or cfg.worker.port
        self.base_url = f"http://{cfg.worker.host}:{self.port}"
        self.state = "stopped"
        self.restarts = 0
        self.proc: Optional[asyncio.subprocess.Process] = None
        self._model_path: Optional[Path] = None
        self._watch_task: Optional[asyncio.Task] = None
        self._stopping = False

    async def start(self) -> None:
        """Start the worker and wait until it has loaded the model."""
        self._model_path = resolve_model_path(self.cfg)
        self._stopping = False
        await self._spawn()
        try:
            await self._wait_healthy(self.cfg.worker.startup_timeout_s)
        except BaseException:
            await self._terminate()
            raise
        self._watch_task = asyncio.create_task(self._watch(), name="worker-supervisor")

    async def _spawn(self) -> None:
        cmd = worker_command(self.cfg, self._model_path, self.port, self.adapters())
        log.info("starting model worker: %s", " ".join(cmd))
        self.state = "starting"
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            cwd=str(Path(__file__).resolve().parent.parent),  # `-m model` needs the repo root
            start_new_session=True,  # Ctrl-C goes to the bot, which shuts the worker down
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    async def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc is None or self.proc.returncode is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise WorkerStartError(
                        f"the model worker exited during start-up (exit code {code}); "
                        "its log above says why"
                    )
                try:
                    async with session.get(self.base_url + "/health",
                                           timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        if resp.status == 200 and (await resp.json()).get("loaded", True):
                            self.state = "ready"
                            log.info("model worker ready on %s (pid %s)", self.base_url, self.proc.pid)
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise WorkerStartError(
                        f"the model worker did not become ready within {timeout:.0f} s "
                        "(worker.startup_timeout_s)"
                    )
                await asyncio.sleep(HEALTH_POLL_S)

    async def _watch(self) -> None:
        """Restart the worker whenever it exits, waiting longer after each quick death."""
        backoff = RESTART_BACKOFF_START_S
        while not self._stopping:
            started = time.monotonic()
            code = await self.proc.wait()
            if self._stopping:
                return
            self.state = "restarting"
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_START_S
            log.error("model worker exited with code %s; restarting in %.0f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            if self._stopping:
                return
            try:
                await self._spawn()
                await self._wait_healthy(self.cfg.worker.startup_timeout_s)
                self.restarts += 1
            except (WorkerStartError, OSError) as exc:
                log.error("model worker restart failed: %s", exc)
                await self._terminate()  # the loop waits on it and tries again, later

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), self.cfg.worker.drain_timeout_s + KILL_GRACE_EXTRA_S)
        except asyncio.TimeoutError:
            log.warning("model worker did not exit after SIGTERM; killing it")
            proc.kill()
            await proc.wait()
        except ProcessLookupError:
            pass

    async def stop(self) -> None:
        """SIGTERM the worker (it drains), then SIGKILL if it lingers."""
        self._stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):
                pass
        await self._terminate()
        self.state = "stopped"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
