"""Who runs in the next engine step: slot bookkeeping and the prefill budget.

Pure bookkeeping, no torch. Requests get the lowest free cache slot (so the
decode batch, slots 0..n-1, stays dense), and each step prefills at most
`budget` prompt tokens, oldest admission first, cutting a long prompt into
chunks: running streams wait for one chunk, never for a whole long prompt.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from model.sequence import Phase, Sequence

PREFILL_CHUNK_TOKENS = 512  # prompt tokens fed per engine step (one chunk between decode steps)


class Slots:
    """Cache rows 0..n-1; the lowest free one is handed out first."""

    def __init__(self, n: int):
        self.n = n
        self._free = list(range(n))
        self.owner: dict[int, Sequence] = {}

    def free(self) -> int:
        return len(self._free)

    def next_free(self) -> int:
        """The slot `take` would hand out next (there must be one)."""
        return self._free[0]

    def take(self, seq: Sequence) -> int:
        slot = heapq.heappop(self._free)
        self.owner[slot] = seq
        seq.slot = slot
        return slot

    def give_back(self, seq: Sequence) -> None:
        if seq.slot is not None and self.owner.get(seq.slot) is seq:
            del self.owner[seq.slot]
            heapq.heappush(self._free, seq.slot)
        seq.slot = None

    def decode_rows(self) -> int:
        """Batch rows of a decode step: up to the highest slot whose sequence is decoding."""
        return 1 + max((s for s, q in self.owner.items() if q.phase == Phase.DECODING), default=-1)


@dataclass(frozen=True)
class Chunk:
    seq: Sequence
    tokens: list[int]  # the next prompt tokens to feed, from position seq.cached

    @property
    def last(self) -> bool:
        return self.seq.cached + len(self.tokens) == len(self.seq.prompt_ids)


def prefill_chunks(prefilling: list[Sequence], budget: int = PREFILL_CHUNK_TOKENS) -> list[Chunk]:
    """This step's prompt chunks: oldest first, at most `budget` tokens, at least one chunk."""
    chunks: list[Chunk] = []
    for seq in prefilling:
        if budget <= 0:
            break
        n = min(seq.prompt_left, budget)
        chunks.append(Chunk(seq, seq.prompt_ids[seq.cached:seq.cached + n]))
        budget -= n
    return chunks
