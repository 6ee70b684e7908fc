"""Shared fixtures: the tiny Qwen2-architecture base model, built from the project's data.

The base is built once per data/code version and cached under tests/.cache, so
the first run pays a short CPU pretraining and later runs load it from disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
# Pretraining steps for the test base: enough to memorise part of the general set.
TEST_PRETRAIN_STEPS = int(os.environ.get("LOOPCORD_TEST_PRETRAIN_STEPS", "1000"))

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _fingerprint() -> str:
    h = hashlib.sha256(str(TEST_PRETRAIN_STEPS).encode())
    for f in sorted((ROOT / "data").glob("*.jsonl")) + [ROOT / "trainer" / "demo_base.py"]:
        if f.exists():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """Path to a pretrained tiny base model in Hugging Face layout."""
    from trainer.demo_base import build_default

    out = CACHE / f"demo-base-{_fingerprint()}"
    if not (out / "model.safetensors").exists():
        # Build privately, then rename: two test runs building at once never mix files.
        tmp = CACHE / f".building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build_default(tmp, steps=TEST_PRETRAIN_STEPS)
        try:
            tmp.rename(out)
        except OSError:  # another run finished first; its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
    return out
