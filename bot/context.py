"""Build the prompt for the model from a conversation: reply chain or thread history.

The front-end turns Discord messages into plain `Turn`s (oldest first, the new
question last); `build_prompt` keeps the newest turns that fit the token budget
and the message cap, and always puts the identity system prompt first. Tokens
are estimated from characters — loading a tokenizer in the bot would cost
memory and start-up time for a number that only needs to be roughly right.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Optional

CHARS_PER_TOKEN = 3.5  # conservative for English; CJK is ~1 char/token, see below
TOKENS_PER_MESSAGE = 4  # chat-template overhead per message (<|im_start|>role ... <|im_end|>)
TRUNCATION_MARK = "…"

Role = Literal["user", "assistant"]
_MENTION = re.compile(r"<@!?(\d+)>")


@dataclass
class Turn:
    """One message of a conversation, free of Discord types."""

    role: Role
    content: str
    message_id: Optional[int] = None
    author_id: Optional[int] = None


def estimate_tokens(text: str) -> int:
    """A cheap upper-leaning token estimate: wide (CJK) characters count as one each."""
    wide = sum(1 for ch in text if ord(ch) >= 0x2E80)
    return math.ceil((len(text) - wide) / CHARS_PER_TOKEN) + wide


def message_tokens(content: str) -> int:
    return estimate_tokens(content) + TOKENS_PER_MESSAGE


def strip_mention(text: str, bot_id: int) -> str:
    """Remove the bot's own mention(s) from a message, keep other mentions."""
    return _MENTION.sub(lambda m: "" if int(m.group(1)) == bot_id else m.group(0), text).strip()


def _truncate_to_tokens(text: str, tokens: int) -> str:
    """Keep the start of `text` within about `tokens` tokens."""
    if estimate_tokens(text) <= tokens:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits
        mid = (lo + hi + 1) // 2
        if estimate_tokens(text[:mid]) + 1 <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + TRUNCATION_MARK


def build_prompt(
    system: str,
    turns: list[Turn],
    *,
    token_budget: int,
    max_messages: int,
) -> list[dict]:
    """OpenAI chat messages: the system prompt, then the newest turns that fit, oldest first.

    The last turn (the question being answered) is always kept, shortened if it
    alone exceeds the budget; older turns are dropped whole, and a kept history
    never starts with an assistant turn whose question was dropped.
    """
    turns = [t for t in turns if t.content.strip()]
    if not turns:
        raise ValueError("build_prompt needs at least one turn with text (the question)")
    remaining = token_budget - message_tokens(system)
    question = turns[-1]
    q_text = _truncate_to_tokens(question.content, max(remaining - TOKENS_PER_MESSAGE, 1))
    remaining -= message_tokens(q_text)
    kept: list[Turn] = []
    for turn in reversed(turns[:-1]):
        cost = message_tokens(turn.content)
        if len(kept) + 1 >= max_messages or cost > remaining:
            break
        kept.append(turn)
        remaining -= cost
    kept.reverse()
    while kept and kept[0].role == "assistant":
        kept.pop(0)
    messages = [{"role": "system", "content": system}]
    messages += [{"role": t.role, "content": t.content} for t in kept]
    messages.append({"role": question.role, "content": q_text})
    return messages

