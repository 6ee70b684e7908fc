"""Where the tiny test base is: the shipped copy, or a build cached once per version.

The repository ships the base built from the current data and code (devkit/data/tiny-base,
4.6 MB, with the fingerprint of what it was built from), so a fresh clone's tests start at
once. When the data or devkit/tiny_model.py change, the base is rebuilt once per version and
cached under devkit/.cache (a few CPU minutes) until the shipped copy is refreshed:

    python tests/conftest.py      # rebuild devkit/data/tiny-base from the current data and code
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
SHIPPED = HERE / "data" / "tiny-base"
# Pretraining steps for the test base: enough to memorise part of the general set.
PRETRAIN_STEPS = int(os.environ.get("LOOPCORD_TEST_PRETRAIN_STEPS", "1000"))


def fingerprint() -> str:
    """What the base is built from: the pretraining steps, the data and the builder's code."""
    h = hashlib.sha256(str(PRETRAIN_STEPS).encode())
    for f in sorted((ROOT / "data").glob("*.jsonl")) + sorted((HERE / "data").glob("*.jsonl")) + [
            HERE / "tiny_model.py"]:
        if f.exists():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def shipped_is_current() -> bool:
    """The shipped tiny base was built from the current data and code."""
    stamp = SHIPPED / "fingerprint"
    return (SHIPPED / "model.safetensors").exists() and stamp.exists() and stamp.read_text().strip() == fingerprint()


def cached() -> Path:
    """Where this version's build lives in the cache (it may not be built yet)."""
    return CACHE / f"demo-base-{fingerprint()}"


def find() -> Optional[Path]:
    """The base for the current data and code, if one is there: the shipped copy, or a cached build."""
    if shipped_is_current():
        return SHIPPED
    out = cached()
    return out if (out / "model.safetensors").exists() else None


def ensure(say: Callable[[str], None] = print) -> Path:
    """The base for the current data and code, built into the cache if there is none
    (its progress reported through `say` at least every 30 s, so a first run never sits silent)."""
    from devkit.tiny_model import build_default

    found = find()
    if found is not None:
        return found
    out = cached()
    say(f"building the tiny test model ({PRETRAIN_STEPS} pretraining steps, cached in {out.parent}) ...")
    started, last = time.monotonic(), [time.monotonic()]

    def on_step(step: int, loss: float) -> None:
        if time.monotonic() - last[0] >= 30 or step + 1 == PRETRAIN_STEPS:
            last[0] = time.monotonic()
            say(f"  tiny test model: step {step + 1}/{PRETRAIN_STEPS}, loss {loss:.2f}, "
                f"{time.monotonic() - started:.0f} s")

    # Build privately, then rename: two test runs building at once never mix files.
    tmp = CACHE / f".building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_default(tmp, steps=PRETRAIN_STEPS, on_step=on_step)
    try:
        tmp.rename(out)
    except OSError:  # another run finished first; its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"tiny test model ready in {time.monotonic() - started:.0f} s")
    return out


def refresh() -> Path:
    """Rebuild the shipped copy from the current data and code (commit the result)."""
    from devkit.tiny_model import build_default

    tmp = SHIPPED.with_name(".tiny-base-building")
    shutil.rmtree(tmp, ignore_errors=True)
    build_default(tmp, steps=PRETRAIN_STEPS)
    (tmp / "fingerprint").write_text(fingerprint() + "\n")
    shutil.rmtree(SHIPPED, ignore_errors=True)
    tmp.rename(SHIPPED)
    return SHIPPED
