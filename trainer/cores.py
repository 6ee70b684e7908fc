"""Where the trainer's work runs: the training profile in force on this device, torch's CPU
threads, and whether a second process may work beside a CPU run (and how it starts).

Shared by the stages (a training helper, trainer.parallel) and the gate (scores computed
alongside, trainer.gate), so neither imports the other for it. torch is imported inside the
functions: importing this module stays cheap (the CLI's `list`, `promote` never load it).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from model.config import Config, TrainingConfig
from model.process import die_with_parent


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def training_settings(cfg: Config) -> TrainingConfig:
    """training.* with the profile in force applied (training.profile; auto picks by device)."""
    return cfg.training_for(cfg.profile_name(on_gpu()))


def apply_cpu_threads(cfg: Config) -> None:
    """The profile's cpu_threads for torch when there is no GPU (0 keeps torch's default)."""
    import torch

    threads = training_settings(cfg).cpu_threads
    if threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(threads)


PARALLEL_MIN_WEIGHT_BYTES = 64 << 20  # below this, starting a child costs more than it saves


def spare_cores(cfg: Config, base: str, setting: Optional[str] = None) -> bool:
    """Whether a second process should work beside this CPU run (`setting`, default
    `eval.cpu_parallel`): no GPU, the profile's cpu_threads use at most half of the cores
    this process may run on, and for `auto` the base is big enough to pay for a child and
    small enough to load twice."""
    import torch

    setting = setting or cfg.eval.cpu_parallel
    if setting == "off" or torch.cuda.is_available():
        return False
    threads = training_settings(cfg).cpu_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not (0 < threads and 2 * threads <= cores):
        return False
    if setting == "on":
        return True
    weights = sum(f.stat().st_size for f in Path(base).glob("*.safetensors")) or \
        sum(f.stat().st_size for f in Path(base).glob("*.bin"))
    return PARALLEL_MIN_WEIGHT_BYTES <= weights and 2 * weights <= available_memory()


def available_memory() -> int:
    """Bytes of memory free for a new process (Linux MemAvailable; unknown: 0, so auto stays off)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def start_child(target: Callable, args: tuple, name: str):
    """A daemon child process running `target(*args)` (spawned: a fresh interpreter, no torch
    state inherited)."""
    proc = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True, name=name)
    proc.start()
    return proc


def child_setup(cfg: Config) -> None:
    """First thing in a child: die with the trainer, keep stdout (the bot's JSON-lines
    channel) clean, use the profile's CPU threads."""
    die_with_parent()
    sys.stdout = sys.stderr
    apply_cpu_threads(cfg)
