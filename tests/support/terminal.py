"""Running the terminal chat (`python -m bot` with no Discord token) from a test: its config
against a model server, its environment, and a run on a pipe."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent


def write_config(tmp: Path, url, **sections) -> Path:
    data = {"model": {"url": url, "max_tokens": 64},
            "store": {"path": str(tmp / "data" / "loopcord.db")},
            "training": {"registry_dir": str(tmp / "data" / "adapters"), "work_dir": str(tmp / "data" / "runs")}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def bot_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    return {**env, "HF_HUB_OFFLINE": "1", "TERM": "xterm", "PYTHONPATH": str(ROOT)}


async def run_piped(config: Path, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--config", str(config), cwd=ROOT, env=bot_env(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(script.encode()), timeout)
    return subprocess.CompletedProcess(proc.pid, proc.returncode, out.decode(), err.decode())
