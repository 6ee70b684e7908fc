"""Run `python -m model serve` as a child process and know when it is ready: the one launcher.

The bot's supervisor (`bot/supervisor.py`, restarts and backoff), the tests and the
benchmarks all start the worker through `WorkerProcess`:

    worker = WorkerProcess(["--model", path], api_key=new_worker_key()).start()

It refuses a port something else already listens on (an error naming the port),
spawns the child in its own session (Ctrl-C goes to the parent, which drains the
worker) with the kernel told to SIGTERM it if the parent dies, and `wait_ready`
accepts only THIS child: /health must answer while the child lives, the listening
socket must belong to the child's pid (Linux /proc), and with a key a protected
endpoint must accept that key. A second bot therefore never adopts the first
one's worker. `stop()` sends SIGTERM (graceful drain), then SIGKILL.

`child_env()` is how every child (worker, trainer) finds this checkout, installed
or not. Standard library only: no torch in the parent.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Optional, Union

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_POLL_S = 0.2
STOP_GRACE_S = 30.0
PROBE_TIMEOUT_S = 2.0
# The env var the launcher uses to hand a per-run bearer key to its worker child when the
# config names none (model.api_key_env unset or empty): the worker then refuses control calls
# (/sleep, /wake_up, LoRA load/unload) from anyone but the process that launched it.
WORKER_KEY_ENV = "LOOPCORD_WORKER_KEY"
_PR_SET_PDEATHSIG = 1


class WorkerStartError(RuntimeError):
    """The worker cannot be started; the message tells the user what to do."""


def child_env(extra: Optional[dict] = None) -> dict[str, str]:
    """Environment for `python -m model|trainer` children: they import this checkout even when
    it is not pip-installed, and print unbuffered (progress lines arrive as they happen)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else ""), **(extra or {})}


def new_worker_key() -> str:
    return secrets.token_urlsafe(32)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """WorkerStartError naming the port if something already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # Same options as the worker's server (aiohttp sets SO_REUSEADDR): TIME_WAIT is no conflict.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise WorkerStartError(
                    f"port {port} on {host} is already in use by another process (another bot's worker, "
                    f"or another server); stop it or set worker.port to a free port") from None
            raise WorkerStartError(f"cannot use {host}:{port} for the model worker: {exc}") from None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh, None)
                for line in fh:
                    parts = line.split()
                    if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            continue
    return inodes


def listens_on(pid: int, port: int) -> Optional[bool]:
    """Whether process `pid` holds the listening socket of `port` (None: cannot tell here)."""
    if not os.path.exists("/proc/net/tcp"):
        return None
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def worker_command(model: Union[str, Path], host: str, port: int, *, config: Optional[Path] = None,
                   adapters: Optional[dict[str, str]] = None, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "model", "serve"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += ["--model", str(model), "--host", host, "--port", str(port)]
    for name, path in (adapters or {}).items():
        cmd += ["--lora", f"{name}={path}"]
    return cmd + list(extra)


def _load_prctl():
    # Looked up here, in the parent: a dlopen between fork and exec can deadlock on a loader
    # lock another thread of the bot held at the fork.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """`preexec_fn` for the bot's children (worker, trainer): if the parent is killed hard
    (SIGKILL, the OOM killer), the kernel sends the child SIGTERM too (Linux), so no child
    outlives its bot to hold a port or write the registry for nobody."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


# The `preexec_fn` to pass: None where there is no prctl (preexec_fn costs a slower spawn path).
CHILD_PREEXEC = die_with_parent if _PRCTL is not None else None


def _get(url: str, key: Optional[str] = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class WorkerProcess:
    """One `python -m model serve` child. `args` are extra serve flags (`--model` among them,
    unless `model` is given); `api_key` is handed to the child in `key_env` (the env var the
    worker reads its key from: model.api_key_env, WORKER_KEY_ENV by default)."""

    def __init__(self, args: Optional[list[str]] = None, host: str = "127.0.0.1", port: Optional[int] = None,
                 env: Optional[dict] = None, log_path: Optional[Path] = None, *,
                 model: Union[str, Path, None] = None, config: Optional[Path] = None,
                 adapters: Optional[dict[str, str]] = None, api_key: Optional[str] = None,
                 key_env: str = WORKER_KEY_ENV, output: Union[IO, int, None] = subprocess.DEVNULL,
                 new_session: bool = True):
        self.host = host
        self.port = port or free_port(host)
        self.args = list(args or [])
        self.model, self.config, self.adapters = model, config, adapters
        self.api_key = api_key
        self.env = child_env({**(env or {}), **({key_env: api_key} if api_key else {})})
        self.log_path = log_path
        self.output = output  # where the child's stdout+stderr go (None: inherit ours)
        self.new_session = new_session
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def command(self) -> list[str]:
        if self.model is not None:
            return worker_command(self.model, self.host, self.port, config=self.config,
                                  adapters=self.adapters, extra=tuple(self.args))
        return [sys.executable, "-m", "model", "serve", "--host", self.host, "--port", str(self.port), *self.args]

    def spawn(self) -> "WorkerProcess":
        """Start the child (after checking the port is free); does not wait."""
        check_port_free(self.host, self.port)
        if self.log_path:
            self._log = open(self.log_path, "ab")
        out = self._log or self.output
        self.proc = subprocess.Popen(
            self.command(), cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=self.new_session,
            preexec_fn=CHILD_PREEXEC)
        return self

    def start(self, timeout: float = 120.0) -> "WorkerProcess":
        self.spawn()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop(timeout=5)
            raise
        return self

    def health(self) -> Optional[dict]:
        """The child's /health as a dict ({} for an empty or non-JSON 200), None if not answering."""
        try:
            status, body = _get(f"{self.url}/health")
        except (urllib.error.URLError, OSError):
            return None
        if status != 200:
            return None
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            data = {}
        return data if isinstance(data, dict) else {}

    def is_ours(self, health: Optional[dict] = None) -> bool:
        """The server answering on our port is our child (see the module docstring)."""
        if health and isinstance(health.get("pid"), int) and health["pid"] != self.proc.pid:
            return False  # a worker that reports its pid, and it is another process
        owns = listens_on(self.proc.pid, self.port)
        if owns is False:
            return False
        if self.api_key:  # only our child holds this run's key
            try:
                status, _ = _get(f"{self.url}/v1/models", self.api_key)
            except (urllib.error.URLError, OSError):
                return False
            return status == 200
        return True

    def wait_ready(self, timeout: float) -> dict:
        """The one health wait: until our child answers /health and is ours; its /health."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise WorkerStartError(f"the model worker exited with code {self.proc.returncode} during "
                                       f"start-up{self._log_tail() or '; its log above says why'}")
            health = self.health()
            if health is not None and health.get("loaded", True) and self.is_ours(health):
                return health
            time.sleep(READY_POLL_S)
        raise WorkerStartError(f"the model worker did not become ready on {self.url} within {timeout:.0f} s "
                               f"(worker.startup_timeout_s){self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_path and Path(self.log_path).exists():
            return ":\n" + Path(self.log_path).read_text(errors="replace")[-2000:]
        return ""

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_GRACE_S) -> Optional[int]:
        """SIGTERM (drain), wait, then kill if it will not go; returns the exit code."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
