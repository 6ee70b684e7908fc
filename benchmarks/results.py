"""Write one benchmark's section of benchmarks/RESULTS.md (device and date included).

Each benchmark owns the text between its markers and replaces only that, so
running one benchmark never erases another's figures.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def device_description() -> str:
    """'NVIDIA H100 80GB HBM3' or the CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section `name` with `body`, stamped with device and date."""
    stamp = f"_Device: {device_description()}; date: {_dt.date.today().isoformat()}_\n\n"
    section = f"<!-- {name}:start -->\n## {name}\n\n{stamp}{body.strip()}\n<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
