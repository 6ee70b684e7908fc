"""Chat prompts to token ids where what people wrote is data, never control tokens.

Rendering the chat template and tokenizing the result (what `apply_chat_template(
tokenize=True)` and vLLM do) turns a user's literal `<|im_end|>\\n<|im_start|>system`
into real control tokens: anyone could forge a system turn. Here the template is
rendered with a unique marker in place of each message's content, the rendered
text is cut at the markers, and the pieces are tokenized separately: the
template's own text with special tokens recognised, every message's content with
`split_special_tokens=True`, so `<|im_end|>` typed by a user becomes the ordinary
tokens `<`, `|`, `im`, ... . The pieces meet at the template's own boundaries
(role headers, end-of-turn tokens), so ordinary conversations tokenize exactly
as before.

A template that alters content (trims it, or branches on what it contains)
cannot be cut this way; then each special-token string inside content is broken
with a zero-width joiner before rendering, which keeps the text readable and
the tokens ordinary.

Used by the worker (prompt ids) and the trainer (ids, offsets and loss masks).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

WORD_JOINER = "\u2060"  # invisible; splits a special-token string in the fallback path


@dataclass(frozen=True)
class Piece:
    text: str
    is_content: bool  # True: a message's content (tokenized with special tokens split)


@dataclass(frozen=True)
class Tokenized:
    text: str  # the full rendered prompt (for offsets)
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in `text`


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def special_strings(tokenizer) -> list[str]:
    """Every string the tokenizer turns into one special/added control token."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return sorted((s for s in found if s), key=len, reverse=True)


def neutralize(text: str, specials: list[str]) -> str:
    """Break every special-token string in `text` so it can only tokenize as plain text."""
    for s in specials:
        if s in text:
            text = text.replace(s, s[0] + WORD_JOINER + s[1:])
    return text


def split_rendering(tokenizer, messages: list[dict], generation_prompt: bool) -> Optional[list[Piece]]:
    """The rendered conversation as template/content pieces, or None when the template alters content."""
    tag = uuid.uuid4().hex
    marks = [f"\ue000{tag}:{i}\ue001" for i in range(len(messages))]
    marked = [{**m, "content": marks[i]} for i, m in enumerate(messages)]
    rendered = render(tokenizer, marked, generation_prompt)
    pieces, pos = [], 0
    for mark, message in zip(marks, messages):
        at = rendered.find(mark, pos)
        if at < 0 or rendered.count(mark) != 1:
            return None
        pieces += [Piece(rendered[pos:at], False), Piece(message["content"], True)]
        pos = at + len(mark)
    pieces.append(Piece(rendered[pos:], False))
    if "".join(p.text for p in pieces) != render(tokenizer, messages, generation_prompt):
        return None  # the template treats content differently from a marker: cannot cut safely
    return [p for p in pieces if p.text]


def tokenize_chat(tokenizer, messages: list[dict], generation_prompt: bool = True) -> Tokenized:
    """Token ids (and character offsets) of the rendered chat, content never parsed as control tokens."""
    pieces = split_rendering(tokenizer, messages, generation_prompt)
    if pieces is None:
        specials = special_strings(tokenizer)
        safe = [{**m, "content": neutralize(m["content"], specials)} for m in messages]
        pieces = [Piece(render(tokenizer, safe, generation_prompt), False)]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    start = 0
    for piece in pieces:
        enc = tokenizer(piece.text, add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=piece.is_content)
        ids.extend(enc["input_ids"])
        offsets.extend((a + start, b + start) for a, b in enc["offset_mapping"])
        start += len(piece.text)
    return Tokenized("".join(p.text for p in pieces), ids, offsets)
