"""One chat request inside the engine: its prompt, sampling settings and progress.

A sequence moves WAITING -> PREFILLING (holds a cache slot, its prompt is fed
in chunks) -> DECODING (one token per engine step) -> FINISHED. `cached`
counts the tokens whose keys and values are in its slot; the next token fed
to the model goes to position `cached`.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from model.adapters import AdapterVersion
from model.detokenize import IncrementalDetokenizer, StopStrings

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class Phase(enum.StrEnum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: sequences are kept in lists and compared by `is`
class Sequence:
    """One chat request inside the engine."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]  # thread-safe; gets ("delta", text) then ("done", reason, usage) or ("error", msg)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    adapter: Optional[AdapterVersion] = None  # held version; None = base model
    arrival: float = field(default_factory=time.monotonic)
    # runtime state
    phase: Phase = Phase.WAITING
    slot: Optional[int] = None  # KV cache row while prefilling/decoding
    cached: int = 0  # tokens whose KV is in the slot
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: Optional[str] = None
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    detok: Optional[IncrementalDetokenizer] = None
    stops: Optional[StopStrings] = None
    generator: Optional[object] = None  # torch.Generator for seeded sampling

    @property
    def prompt_left(self) -> int:
        return len(self.prompt_ids) - self.cached

    @property
    def adapter_name(self) -> Optional[str]:
        return self.adapter.internal if self.adapter is not None else None


def check_sampling(seq: Sequence, vocab_size: int) -> None:
    """Refuse settings the sampler cannot honour (the engine's own guard; the API validates first).

    Raises ValueError naming the field, so that request fails alone at admission.
    """
    t, p = seq.temperature, seq.top_p
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
    if not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if seq.seed is not None and (not isinstance(seq.seed, int) or not INT64_MIN <= seq.seed <= UINT64_MAX):
        raise ValueError(f"seed must be an integer in [{INT64_MIN}, {UINT64_MAX}], got {seq.seed!r}")
    if not seq.prompt_ids:
        raise ValueError("the prompt is empty")
    if any(not isinstance(i, int) or not 0 <= i < vocab_size for i in seq.prompt_ids):
        raise ValueError(f"the prompt holds token ids outside the vocabulary (0..{vocab_size - 1})")
    if not isinstance(seq.max_tokens, int) or seq.max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {seq.max_tokens!r}")
