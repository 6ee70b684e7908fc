"""Split a model answer into Discord messages of at most 2000 characters.

Cuts fall on paragraph boundaries, else line boundaries; a single line longer
than a message is cut hard (at a space when there is one). When a cut falls
inside a fenced code block, the part is closed with ``` and the next part
re-opens the fence with its language, so each message renders on its own.
Removing those added markers and joining the parts gives back the text exactly
(`join_parts` does it; the tests hold the splitter to that).

Once a text is longer than one message, its first parts never change as the
text grows, so a streaming answer can be split again after every token and
only the last message is edited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DISCORD_MESSAGE_LIMIT = 2000
FENCE = "```"
CLOSE_MARKER = "\n" + FENCE  # appended to a part that ends inside a code block
MAX_FENCE_LANG = 32  # longer info strings are not repeated when re-opening
STREAMING_CURSOR = " ▌"  # shown after the text while the answer is still coming
EMPTY_ANSWER = "*(the model returned an empty answer)*"

_FENCE_LINE = re.compile(r"^ {0,3}(`{3,})(.*)$")


@dataclass(frozen=True)
class Part:
    """One Discord message: `body` is a slice of the answer; the markers were added."""

    body: str
    reopen: str = ""  # "```lang\n" re-opening a fence cut by the previous part
    close: str = ""  # "\n```" closing a fence this part leaves open

    @property
    def content(self) -> str:
        return self.reopen + self.body + self.close


def fence_state(text: str, open_lang: str | None) -> str | None:
    """The code fence open at the end of `text` (its language, '' if none), or None."""
    for line in text.split("\n"):
        m = _FENCE_LINE.match(line)
        if not m:
            continue
        if open_lang is None:
            open_lang = m.group(2).strip()
        elif not m.group(2).strip():  # a closing fence carries no info string
            open_lang = None
    return open_lang


def _cut_position(text: str, budget: int) -> int:
    """Where to cut `text` so the first piece has at most `budget` characters."""
    window = text[: budget + 1]  # a boundary right after budget chars still fits
    paragraph = window.rfind("\n\n", 0, budget + 1)
    if paragraph >= budget // 2:
        return paragraph + 2 if paragraph + 2 <= budget else paragraph + 1
    line = window.rfind("\n", 0, budget)
    if line > 0:
        return line + 1
    space = window.rfind(" ", budget // 2, budget)
    if space > 0:
        return space + 1
    cut = budget
    # Never separate a surrogate-free grapheme's combining mark from its base.
    while cut > 1 and _is_combining(text[cut]):
        cut -= 1
    return cut


def _is_combining(ch: str) -> bool:
    import unicodedata

    return unicodedata.combining(ch) != 0 or ch in "\u200d\ufe0f"


def split_parts(text: str, limit: int = DISCORD_MESSAGE_LIMIT) -> list[Part]:
    """Split `text` into parts whose `content` is at most `limit` characters."""
    parts: list[Part] = []
    rest, lang = text, None
    while True:
        reopen = f"{FENCE}{lang}\n" if lang is not None else ""
        if len(reopen) + len(rest) <= limit:
            parts.append(Part(rest, reopen))
            return parts
        budget = limit - len(reopen) - len(CLOSE_MARKER)
        cut = _cut_position(rest, budget)
        body, rest = rest[:cut], rest[cut:]
        lang = fence_state(body, lang)
        if lang is not None and len(lang) > MAX_FENCE_LANG:
            lang = ""
        close = ("" if body.endswith("\n") else "\n") + FENCE if lang is not None else ""
        parts.append(Part(body, reopen, close))


def split_message(text: str, limit: int = DISCORD_MESSAGE_LIMIT) -> list[str]:
    """The Discord message contents for `text` (never empty, each <= limit)."""
    if not text.strip():
        return [EMPTY_ANSWER]
    return [p.content for p in split_parts(text, limit)]


def join_parts(parts: list[Part]) -> str:
    """The original text: the parts' bodies without the added fence markers."""
    return "".join(p.body for p in parts)


def streaming_view(text: str, limit: int = DISCORD_MESSAGE_LIMIT) -> list[str]:
    """Message contents while an answer is still streaming: the last one shows a cursor."""
    if not text.strip():
        return ["⏳"]
    contents = split_message(text, limit)
    if len(contents[-1]) + len(STREAMING_CURSOR) <= limit:
        contents[-1] += STREAMING_CURSOR
    return contents
