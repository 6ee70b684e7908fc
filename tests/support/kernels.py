"""Turning model.bf16_rows' kernels off, as on a CPU where they do not run."""

from __future__ import annotations

from model import bf16_rows


def turn_off_kernels(monkeypatch) -> None:
    """As on a CPU where bf16_rows' kernels do not run: `LOOPCORD_BF16_ROWS=0`, looked at afresh."""
    monkeypatch.setattr(bf16_rows, "_tried", False)
    monkeypatch.setattr(bf16_rows, "_kernel", None)
    monkeypatch.setenv("LOOPCORD_BF16_ROWS", "0")
