"""General replay answered by the base model itself (self-distillation against forgetting).

Mixing general data into identity or correction training (seed 003) keeps much more of
what the base can do than identity-only training, but the dataset's own answers are
another writer's: training on them pulls the model's style and facts toward that
writer, and on a small model it costs a third of what the base answered right
(benchmarks/RESULTS.md, quality_bench). When `training.mix.replay_answers` is `base`,
each general replay question is answered by the base model (greedy, under the identity
system prompt, as the bot asks), and the model is trained on those answers: the replay
then says "answer as you already do", which the gate's retention check measures.

An answer cut off at REPLAY_MAX_NEW_TOKENS keeps its complete sentences; an empty one, or
one that claims another identity, leaves the dataset's answer in place. Answers are cached per base model in
the registry (`.base-replay/`), so each question is generated once for every later run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

from trainer.datasets import Messages, with_system
from trainer.encode import BASE_ANSWER
from trainer.registry import read_json_cache, write_json_atomic

REPLAY_DIR = ".base-replay"  # inside the registry, one cache file per base model
REPLAY_MAX_NEW_TOKENS = 96  # a longer general replay answer keeps its complete sentences
CACHE_FORMAT = 2  # bump when what is cached for a question changes

Generate = Callable[[list[Messages]], list[tuple[str, bool]]]


def cache_file(registry_root: Path, base: str) -> Path:
    return Path(registry_root) / REPLAY_DIR / (hashlib.sha256(str(base).encode()).hexdigest()[:12] + ".json")


def prompt_key(prompt: Messages) -> str:
    blob = json.dumps([prompt, REPLAY_MAX_NEW_TOKENS, CACHE_FORMAT], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|[。！？]")  # "3.5" is not an end; Chinese needs no space


def usable(answer: str, ended: bool, claims: Callable[[str], Sequence[str]]) -> Optional[str]:
    """The base answer fit to train on, or None: an answer cut off by REPLAY_MAX_NEW_TOKENS
    keeps its complete sentences (still the base's own words, now ending where a sentence
    does); an empty one, or one claiming another identity (the base's own name must not be
    taught back to it), is not used."""
    text = answer.strip()
    if not ended:
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        text = text[:ends[-1]] if ends else ""
    if not text or claims(text):
        return None
    return text


def answered_by_base(rows: Sequence[Messages], system: str, cache: Path, generate: Generate,
                     claims: Callable[[str], Sequence[str]], say: Optional[Callable[[str], None]] = None) -> tuple[list[Messages], dict]:
    """`rows` (general samples) under `system`, each answered by the base where its answer
    is usable; (samples, counts). Only questions missing from the cache are generated."""
    prompts = [with_system(r[:-1], system) for r in rows]
    keys = [prompt_key(p) for p in prompts]
    known = read_json_cache(cache)
    missing = list(dict.fromkeys(k for k in keys if k not in known))
    if missing:
        if say:
            say(f"answering {len(missing)} general replay question(s) with the base model (cached for later runs)")
        first = {k: p for k, p in zip(keys, prompts) if k in missing}
        replies = generate([first[k] for k in missing])
        for k, (answer, ended) in zip(missing, replies):
            known[k] = usable(answer, ended, claims)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, known)
    out, from_base = [], 0
    for prompt, key, row in zip(prompts, keys, rows):
        answer = known.get(key)
        if isinstance(answer, str):
            out.append(prompt + [{"role": "assistant", "content": answer, BASE_ANSWER: True}])
            from_base += 1
        else:
            out.append(prompt + [row[-1]])
    return out, {"general_answered_by_base": from_base, "general_generated_now": len(missing)}
