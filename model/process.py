"""Run `python -m model serve` as a child process and know when it is ready.

Used by the tests and the benchmark, and usable by whoever embeds the worker:
`WorkerProcess(["--model", path]).start()` spawns it on a free loopback port,
waits for /health, and `stop()` sends SIGTERM (graceful drain) and reaps it.
Standard library only: no torch in the parent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_POLL_S = 0.2
STOP_GRACE_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class WorkerProcess:
    def __init__(self, args: list[str], host: str = "127.0.0.1", port: Optional[int] = None,
                 env: Optional[dict] = None, log_path: Optional[Path] = None):
        self.host = host
        self.port = port or free_port(host)
        self.args = args
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "WorkerProcess":
        cmd = [sys.executable, "-m", "model", "serve", "--host", self.host, "--port", str(self.port), *self.args]
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def health(self) -> Optional[dict]:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode} before it was ready{self._log_tail()}")
            health = self.health()
            if health is not None:
                return health
            time.sleep(READY_POLL_S)
        self.kill()
        raise RuntimeError(f"worker not ready after {timeout:.0f}s{self._log_tail()}")

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
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
