"""The community memory: an approved correction answers at once, before any retrain.

Every approved correction becomes an entry (its question, the approved answer, who
suggested and approved it, and its scope: the Discord server it was made in, DMs, or the
terminal), with a sentence embedding of its question and answer stored beside it (model.embedding).
For each question the bot asks the memory for same-scope entries close in meaning (cosine
similarity at least `memory.min_similarity`, chosen by measurement: benchmarks/memory_bench.py)
that name nothing else than it asks about, and puts them into the prompt as facts the community confirmed
(`bot.context.build_prompt`); an unrelated question finds none and gets exactly the prompt it
would get without a memory. The store owns the entries' lifetime (an entry goes in the same
transaction as its correction's approval is withdrawn, edited, retracted or forgotten); this
module adds the entries for what is approved (`sync`, after each approval and at start, so an
upgrade or a model change fills them in) and searches them, keeping each scope's vectors in a
matrix until the store says the memory changed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from model.config import Config
from model.embedding import Embedder, EmbeddingError, from_blobs, to_blob

from trainer.matching import other_subject

from bot.admin import claimed_identities
from bot.store import MemoryRow, Store

log = logging.getLogger(__name__)

TERMINAL_SCOPE = "terminal"
DM_SCOPE = "dm"
EMBEDDINGS_DIR = "models"  # inside the data directory: the extracted embedding model
RECALL_SPARE = 3  # entries searched beyond memory.max_facts, for those about another subject


def scope_of(guild_id: Optional[int], channel_id: Optional[int]) -> str:
    """Where a fact taught here may answer: its Discord server; DMs share one scope; the
    terminal (no channel at all) has its own."""
    if guild_id is not None:
        return f"guild:{guild_id}"
    return DM_SCOPE if channel_id is not None else TERMINAL_SCOPE


@dataclass(frozen=True)
class Fact:
    """A memory entry found for a question, with how close its question is (cosine)."""

    correction_id: int
    question: str
    answer: str
    suggested_by: Optional[int]
    approved_by: Optional[int]
    score: float


class Memory:
    """Adds, caches and searches memory entries. `await start()` loads the embedding model."""

    def __init__(self, cfg: Config, store: Store, embedder: Optional[Embedder] = None):
        self.cfg = cfg
        self.store = store
        self.embedder = embedder
        self.error: Optional[str] = None  # why the memory is off, for /status
        self._cache: dict[str, tuple[int, list[dict], torch.Tensor]] = {}
        self._sync_lock = asyncio.Lock()

    @property
    def on(self) -> bool:
        return self.cfg.memory.enabled and self.embedder is not None

    async def start(self) -> None:
        """Load the embedding model (in a thread: seconds) and fill in missing entries. A model
        that cannot load turns the memory off with the reason in the log and /status."""
        if not self.cfg.memory.enabled:
            return
        if self.embedder is None:
            try:
                self.embedder = await asyncio.to_thread(
                    Embedder.load, self.cfg.memory.embedding_model, self.cfg.path(self.cfg.memory.cache_dir))
            except EmbeddingError as exc:
                self.error = str(exc)
                log.error("the community memory is off: %s", exc)
                return
        await self.sync()

    async def sync(self) -> int:
        """Make every approved correction without an entry (of this embedding model) one."""
        if not self.on:
            return 0
        async with self._sync_lock:
            # A correction that claims another identity ("I am ChatGPT") may be approved for the record,
            # but it never answers: it would teach members the bot is someone else.
            rows = [r for r in await self.store.corrections_missing_memory(self.embedder.name)
                    if not claimed_identities(self.cfg, r["text"])]
            if not rows:
                return 0
            vectors = await asyncio.to_thread(entry_vectors, self.embedder, [(r["question"], r["text"]) for r in rows])
            added = 0
            for row, vector in zip(rows, vectors):
                entry = MemoryRow(scope=scope_of(row["guild_id"], row["channel_id"]), question=row["question"],
                                  answer=row["text"], suggested_by=row["user_id"],
                                  embedding_model=self.embedder.name, embedding=to_blob(vector))
                added += await self.store.put_memory(row["id"], row["text"], entry)
            return added

    async def _scope(self, scope: str) -> tuple[list[dict], torch.Tensor]:
        generation = self.store.memory_generation
        cached = self._cache.get(scope)
        if cached is None or cached[0] != generation:
            entries = [e for e in await self.store.memory_entries(scope)
                       if e["embedding_model"] == self.embedder.name]
            matrix = from_blobs([e.pop("embedding") for e in entries], self.embedder.dim)
            cached = (generation, entries, matrix)
            self._cache[scope] = cached
        return cached[1], cached[2]

    async def search(self, scope: str, text: str, limit: int) -> list[Fact]:
        """The `limit` entries of `scope` closest to `text`, best first, whatever their score."""
        if not self.on or not text.strip():
            return []
        entries, matrix = await self._scope(scope)
        if not entries:
            return []
        (query,) = await asyncio.to_thread(self.embedder.encode, [text])
        scores = matrix @ query
        top = torch.topk(scores, min(limit, len(entries)))
        return [fact_of(entries[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    async def recall(self, scope: str, question: str) -> list[Fact]:
        """The facts to put into the prompt for `question`: the closest entries at or above
        `memory.min_similarity` that are about what it asks (`other_subject`: "the capital of
        Portugal?" is not answered by the fact about Brazil's), at most `memory.max_facts`, best
        first (none for most questions: then the prompt is exactly what it would be without a memory)."""
        m = self.cfg.memory
        found = await self.search(scope, question, m.max_facts + RECALL_SPARE)
        return [f for f in found if f.score >= m.min_similarity
                and not other_subject(question, f.question, f.answer)][:m.max_facts]


def entry_vectors(embedder: Embedder, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """An entry's vector: the mean of its question's and its answer's embeddings, so a question's
    score is the mean of its similarity to both (on the development facts, 150 of 156 unseen
    rewordings found their own fact first this way; 146 by the stored question alone)."""
    questions = embedder.encode([q for q, _ in pairs])
    answers = embedder.encode([a for _, a in pairs])
    return (questions + answers) / 2


def fact_of(entry: dict, score: float = 0.0) -> Fact:
    return Fact(correction_id=entry["correction_id"], question=entry["question"], answer=entry["answer"],
                suggested_by=entry["suggested_by"], approved_by=entry["approved_by"], score=round(score, 4))
