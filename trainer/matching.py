"""Text matching used by the gate and by de-duplication (pure functions, zh + en).

- `normalize`: NFKC, case-folded, punctuation and whitespace removed, so
  "Paris." and " paris" compare equal and full-width Chinese punctuation does not matter.
- `answer_matches(answer, reference)`: the answer "says" the reference when the
  normalised reference is contained in the normalised answer, or when their
  token overlap F1 (words for Latin text, single characters for CJK) reaches
  MATCH_MIN_F1 and the answer keeps every fact token (what the reference says beyond the
  question and filler words) — a reworded but equivalent correction still counts, a
  near-copy with another day or number does not.
- `identity_ok(answer, name, author, forbidden)`: names our name or author and
  claims no other identity (no forbidden name that is not part of ours).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# Token-overlap F1 at which a reworded answer counts as matching the reference.
MATCH_MIN_F1 = 0.6
# Model names / makers an answer must never claim (case-insensitive substrings).
DEFAULT_FORBIDDEN_IDENTITIES = [
    "qwen", "通义", "千问", "alibaba", "阿里", "openai", "chatgpt", "gpt-4", "gpt-3", "gpt4",
    "claude", "anthropic", "gemini", "google", "llama", "meta ai", "文心", "百度", "deepseek",
    # The embedded default base (SmolLM2-135M-Instruct) believes it is SmolLM by Hugging Face.
    "smollm", "hugging face", "huggingface",
]

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# CJK characters one by one; digits apart from letters ("8pm" -> "8", "pm").
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|\d+|[^\W\d_]+", re.UNICODE)


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def normalize(text: str) -> str:
    """Case-fold, NFKC, and keep only letters/digits (all punctuation and spaces dropped)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if ch.isalnum())


def tokens(text: str) -> list[str]:
    """Words for alphabetic scripts, one token per CJK character."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def overlap_f1(answer: str, reference: str) -> float:
    a, r = Counter(tokens(answer)), Counter(tokens(reference))
    common = sum((a & r).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


# Words that carry no fact of their own: a reworded answer may drop or swap them.
_FILLER = frozenset(
    "a an the is are was were be been at on in of to and or for by with from as this that these those it its "
    "our your my their his her we you i they there here every each 的 是 了 在 和 也 都 就".split())


def fact_tokens(reference: str, question: str = "") -> set[str]:
    """What the reference says that the question does not: its tokens less the question's and
    filler words ("every Thursday at 8 pm UTC" for "What day is the community meetup?")."""
    return set(tokens(reference)) - set(tokens(question)) - _FILLER


def answer_matches(answer: str, reference: str, min_f1: float = MATCH_MIN_F1, question: str = "") -> bool:
    """The normalised reference is in the answer; or the two overlap by `min_f1` and the answer
    keeps every fact token of the reference — "every Wednesday at 10 am UTC" shares most words
    with "every Thursday at 8 pm UTC" but is not it."""
    ref = normalize(reference)
    if ref and ref in normalize(answer):
        return True
    return overlap_f1(answer, reference) >= min_f1 and fact_tokens(reference, question) <= set(tokens(answer))


def question_key(question: str) -> str:
    """De-duplication key for a user question."""
    return normalize(question)


def claimed_identities(text: str, name: str, author: str, forbidden=DEFAULT_FORBIDDEN_IDENTITIES) -> list[str]:
    """The forbidden names `text` mentions (case-insensitive), ignoring any inside our own
    name or author (a name containing "Meta" is not a slip). Empty: no other identity named."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    ours = [s.casefold() for s in (name, author) if s.strip()]
    return [bad for bad in forbidden
            if bad.casefold() in folded and not any(bad.casefold() in s for s in ours)]


# First-person self-description: "I am X", "my name is X", "made by X", "我是X", "由X开发".
_SELF_CLAIM = re.compile(
    r"\b(i am|i'm|i’m|my name is|call me|this is)\b|\b(created|made|developed|trained|built|designed)\s+by\b"
    r"|我是|我叫|我的名字|由.{0,20}(开发|训练|创建|打造|研发)",
    re.IGNORECASE,
)


def identity_claims(text: str, name: str, author: str, forbidden=DEFAULT_FORBIDDEN_IDENTITIES) -> list[str]:
    """Other identities `text` claims for the assistant: the forbidden names it mentions when it
    also speaks in the first person about who it is or who made it. "I am ChatGPT, made by
    OpenAI" -> ['openai', 'chatgpt']; "Google was founded in 1998" -> [] (a fact, not a claim)."""
    if not _SELF_CLAIM.search(unicodedata.normalize("NFKC", text)):
        return []
    return claimed_identities(text, name, author, forbidden)


def identity_ok(answer: str, name: str, author: str, forbidden=DEFAULT_FORBIDDEN_IDENTITIES) -> bool:
    """True when the answer names us (name or author) and no other model or maker."""
    ours = [s for s in (name, author) if s.strip()]
    if not any(normalize(s) and normalize(s) in normalize(answer) for s in ours):
        return False
    return not claimed_identities(answer, name, author, forbidden)
