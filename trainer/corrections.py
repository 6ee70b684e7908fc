"""User corrections (exported by the bot) -> calibration samples.

Input: JSONL, one approved correction per line, as trainer.protocol.CorrectionRecord
defines it (the bot writes it through the same type):
  {"id", "exchange_id", "messages": [prompt sent to the model, system first],
   "bad_answer", "correction", "user_id", "approved_by", "created_at", "approved_at"}
The bot exports every approved correction each time, so this module
de-duplicates (the latest approved correction for the same question wins),
turns each into two samples (the exchange with our identity system prompt,
and the identity-prefixed rewording the seeds' calibration layer uses) and
mixes in identity samples and general replay by `training.mix` ratios.
Corrections the parent adapter already learned (recorded in its lineage's
manifests) are replayed once; new ones are repeated `new_repeats` times, so a
run spends its steps on what is new while the old answers are kept.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Optional, Sequence

from trainer.datasets import DataError, Messages, both_system_variants, read_jsonl_rows, sample_rows, with_system
from trainer.matching import identity_claims, is_chinese, normalize, question_key
from trainer.protocol import MAX_CORRECTION_CHARS, CorrectionRecord, RefusedCorrection

PREFIX_EN = "As {{NAME}} made by {{AUTHOR}}, answer: "
PREFIX_ZH = "作为{{AUTHOR}}开发的{{NAME}}，请回答："
# Rewordings of a corrected question, by rule ({q}: the question; {ql}: it with a lower-case
# first letter). Calibrate trains on the first `training.mix.rewordings` of TRAIN_*; the gate
# checks GATE_* ones, which training never sees, so "learned" means it carries over.
TRAIN_REWORDINGS_EN = [
    "Quick question: {q}", "{q} Please answer briefly.", "I'd like to know: {q}", "Hey, {ql}",
    "{q} Answer in one sentence.", "Do you know this? {q}", "Help me out here. {q}", "Tell me, {ql}",
]
TRAIN_REWORDINGS_ZH = [
    "请问，{q}", "{q}请简短回答。", "我想知道：{q}", "快问一下：{q}", "{q}用一句话回答。", "你知道吗？{q}",
    "帮我一下：{q}", "告诉我，{q}",
]
GATE_REWORDINGS_EN = ["Can you answer this for me: {ql}", "{q} I need to know."]
GATE_REWORDINGS_ZH = ["麻烦回答我：{q}", "{q}我需要知道。"]


@dataclass
class Correction:
    id: int
    messages: Messages  # the prompt, ending with the user's question
    correction: str
    bad_answer: str
    approved_at: str
    exchange_id: Optional[int] = None

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


def _text(content, where: str) -> str:
    """OpenAI content may be a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
    raise DataError(f"{where}: message content must be a string or a list of text parts")


def _timestamp(value, key: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be an ISO 8601 string, got {value!r}")
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"{where}: '{key}' is not an ISO 8601 time: {value!r}") from None
    return value


def parse_correction(row, where: str) -> Correction:
    try:
        record = CorrectionRecord.parse(row)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None
    if not record.correction.strip():
        raise DataError(f"{where}: 'correction' is empty")
    msgs = []
    for i, m in enumerate(record.messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{i}] needs a role of system, user or assistant")
        msgs.append({"role": m["role"], "content": _text(m.get("content"), f"{where}: messages[{i}]")})
    if not msgs or msgs[-1]["role"] != "user":
        raise DataError(f"{where}: 'messages' must end with the user's question")
    approved = _timestamp(record.approved_at, "approved_at", where)
    created = _timestamp(record.created_at, "created_at", where)
    return Correction(
        id=record.id,
        messages=msgs,
        correction=record.correction.strip(),
        bad_answer=record.bad_answer or "",
        approved_at=approved or created,
        exchange_id=record.exchange_id,
    )


def load_corrections(path: str | Path) -> list[Correction]:
    """All corrections in the file (all-or-nothing: a bad line raises DataError naming it)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: corrections file not found")
    return [parse_correction(row, f"{p}:{line}") for line, row in read_jsonl_rows(p)]


def _sort_key(c: Correction):
    try:
        t = dt.datetime.fromisoformat(c.approved_at.replace("Z", "+00:00"))
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        stamp = t.timestamp()
    except ValueError:
        stamp = float("-inf")
    return (stamp, c.id)


def deduplicate(corrections: Sequence[Correction]) -> list[Correction]:
    """One correction per question (normalised last user message): the latest approved wins."""
    latest: dict[str, Correction] = {}
    for c in sorted(corrections, key=_sort_key):
        latest[question_key(c.question)] = c
    return sorted(latest.values(), key=_sort_key)


def refusals(corrections: Sequence[Correction], name: str, author: str,
             forbidden: Sequence[str]) -> list[RefusedCorrection]:
    """The corrections calibrate will not train, each with why: one longer than the bot's own
    limit (an older store may hold one), or one that claims another identity for the assistant,
    which the gate never passes (trainer.gate): training on it would only spend a run to be
    rejected, and every run after it, until someone takes it out."""
    out = []
    for c in corrections:
        if len(c.correction) > MAX_CORRECTION_CHARS:
            out.append(RefusedCorrection(c.id, c.correction, f"it is {len(c.correction):,} characters long, and at "
                                                             f"most {MAX_CORRECTION_CHARS:,} are trained"))
        elif claims := identity_claims(c.correction, name, author, forbidden):
            out.append(RefusedCorrection(c.id, c.correction, f"it claims another identity for the bot "
                                                             f"({', '.join(claims)}), which the gate never passes"))
    return out


def correction_key(question: str, correction: str) -> tuple[str, str]:
    """Identity of a learned correction: the same question with the same answer."""
    return question_key(question), normalize(correction)


def prefixed_question(question: str, fill) -> str:
    """The identity-prefixed form of a question (the seeds' calibration layer)."""
    return fill(PREFIX_ZH if is_chinese(question) else PREFIX_EN) + question


def reword(question: str, templates: Sequence[str], n: int) -> list[str]:
    """The first `n` rule-based rewordings of `question` (fewer when templates run out)."""
    q = question.strip()
    ql = q[:1].lower() + q[1:] if q[:2] != q[:2].upper() else q  # keep "NASA", lower "What"
    return [t.format(q=q, ql=ql) for t in templates[:n]]


# An English wh-question with an auxiliary: "What day is the community meetup?" ->
# wh-phrase "What day", auxiliary "is", rest "the community meetup".
_WH_AUX = re.compile(
    r"^(?P<wh>(?:what|which|who|whom|whose|when|where|why|how)(?:\s+(?:many|much)\s+\w+|\s+(?!is\b|are\b|was\b"
    r"|were\b|do\b|does\b|did\b)\w+)?)\s+(?P<aux>is|are|was|were|do|does|did)\s+(?P<rest>[^?]+?)\s*\?*$",
    re.IGNORECASE)


# What a topic starts with: a determiner or possessive, a name, a handle or a number.
_NOUN_PHRASE = re.compile(r"^(?:(?:the|a|an|our|this|that|these|those|my|your|its|their)\b|(?!I\b)[A-Z#@/]|\d)")


def restructured(question: str) -> list[str]:
    """Rewordings that change the question's structure, not only its wrapping: the indirect
    question ("Do you know what day the community meetup is?") and the topic ("Tell me about
    the community meetup."), for English wh-questions with is/are/was/were; [] otherwise.
    Users ask again in other words, and a model that saw the answer only after one phrasing
    ties it to that phrasing."""
    m = _WH_AUX.match(question.strip())
    if not m or is_chinese(question) or not _NOUN_PHRASE.match(m.group("rest")):
        return []  # "How do I open a ticket?", "Who is allowed to ...": no topic to restructure around
    wh, aux, rest = m.group("wh"), m.group("aux"), m.group("rest")
    wh = wh[:1].lower() + wh[1:]
    out = []
    if aux.lower() in ("is", "are", "was", "were"):
        out.append(f"Do you know {wh} {rest} {aux.lower()}?")
    topic = re.sub(r"\s+(?:there|here)$", "", rest)
    if aux.lower() in ("do", "does", "did"):  # "When does the game jam start": the topic is before the verb
        topic = topic.rsplit(" ", 1)[0] if len(topic.split()) >= 3 else ""
    if len(topic.split()) >= 2:
        out.append(f"Tell me about {topic}.")
    return out


def train_rewordings(question: str, n: int) -> list[str]:
    """The first `n` rewordings calibrate trains: restructured ones first, then wrappers."""
    templated = reword(question, TRAIN_REWORDINGS_ZH if is_chinese(question) else TRAIN_REWORDINGS_EN, n)
    return (restructured(question) + templated)[:n]


def gate_rewordings(question: str) -> list[str]:
    """Held-out rewordings for the gate: never in training data."""
    templates = GATE_REWORDINGS_ZH if is_chinese(question) else GATE_REWORDINGS_EN
    return reword(question, templates, len(templates))


def correction_samples(c: Correction, system: str, fill, rewordings: int = 0) -> list[Messages]:
    """The corrected exchange (our system prompt), its identity-prefixed variant, and
    `rewordings` rule-based rewordings of the question, all answered with the correction."""
    answer = {"role": "assistant", "content": c.correction}
    exchange = with_system(c.messages, system) + [answer]
    prefixed = [{"role": "user", "content": prefixed_question(c.question, fill)}, answer]
    out = [exchange, with_system(prefixed, system)]
    for q in train_rewordings(c.question, rewordings):
        out.append(with_system([{"role": "user", "content": q}, answer], system))
    return out


def calibration_mix(
    corrections: Sequence[Correction],
    identity_rows: Sequence[Messages],
    general_rows: Sequence[Messages],
    identity_ratio: float,
    general_ratio: float,
    system: str,
    fill,
    seed: int,
    new_repeats: int = 1,
    learned: Collection[tuple[str, str]] = (),
    rewordings: int = 0,
    answer_general: Optional[Callable[[list[Messages]], list[Messages]]] = None,
    min_general: int = 0,
) -> tuple[list[Messages], dict]:
    """Correction samples + identity share + general replay, shuffled; returns (samples, counts).

    A correction whose `correction_key` is in `learned` (the parent knows it) is
    replayed once; every other one `new_repeats` times. The identity and general
    shares are relative to all correction samples, repeats included, so the replay
    grows with the weight put on the new answers; it is at least `min_general` rows, so a
    run of one or two corrections is not spent repeating a handful of samples. `answer_general` turns the sampled
    general rows into replay samples (default: under `system` with the dataset's answers;
    trainer.replay answers them with the base model instead).
    """
    if new_repeats < 1:
        raise ValueError(f"new_repeats must be at least 1, got {new_repeats}")
    kept = deduplicate(corrections)
    learned = set(learned)
    fresh = [c for c in kept if correction_key(c.question, c.correction) not in learned]
    known = [c for c in kept if correction_key(c.question, c.correction) in learned]
    new = [s for c in fresh for s in correction_samples(c, system, fill, rewordings)] * new_repeats
    new += [s for c in known for s in correction_samples(c, system, fill)]
    n_identity = round(identity_ratio * len(new)) if identity_rows else 0
    n_general = max(round(general_ratio * len(new)), min_general) if general_rows else 0
    identity = sample_rows(identity_rows, n_identity, seed) if n_identity else []
    general = sample_rows(general_rows, n_general, seed + 1) if n_general else []
    # Identity replay with and without our system prompt (as anchor trains it); general
    # replay and the corrections under our system prompt, as the bot asks them.
    replay = answer_general(general) if answer_general else [with_system(g, system) for g in general]
    samples = new + both_system_variants(identity, system) + replay
    random.Random(seed).shuffle(samples)
    counts = {
        "corrections_in_file": len(corrections),
        "corrections_used": len(kept),
        "corrections_new": len(fresh),
        "new_correction_repeats": new_repeats,
        "rewordings_per_correction": rewordings,
        "correction_samples": len(new),
        "identity_samples": len(identity),
        "general_samples": len(general),
    }
    return samples, counts
