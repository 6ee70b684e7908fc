"""Splitting answers for Discord: 2000-char limit, natural boundaries, code fences re-opened."""

import random

import pytest

from bot.render import (
    DISCORD_MESSAGE_LIMIT,
    EMPTY_ANSWER,
    STREAMING_CURSOR,
    fence_state,
    join_parts,
    split_message,
    split_parts,
    streaming_view,
)

WORDS = ["hello", "world", "数据", "模型", "🙂", "naïve", "x" * 30, "def", "return", "é"]


def random_text(rng: random.Random, n_lines: int) -> str:
    lines = []
    in_fence = False
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.08:
            lines.append("```" if in_fence else "```" + rng.choice(["python", "", "js", "rust"]))
            in_fence = not in_fence
        elif r < 0.15:
            lines.append("")
        elif r < 0.18:
            lines.append("".join(rng.choice("abcdef数据 ") for _ in range(rng.randint(1900, 4500))))
        else:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40))))
    return "\n".join(lines)


def assert_valid(parts, text, limit=DISCORD_MESSAGE_LIMIT):
    assert join_parts(parts) == text
    for p in parts:
        assert 0 < len(p.content) <= limit
    # Each message renders on its own: its fences are balanced (the last one is
    # as balanced as the model's text itself).
    for p in parts[:-1]:
        assert fence_state(p.content, None) is None, p.content[-200:]
    assert fence_state(parts[-1].content, None) == fence_state(text, None)


@pytest.mark.parametrize("seed", range(60))
def test_random_texts_split_within_limit_and_rejoin_exactly(seed):
    rng = random.Random(seed)
    text = random_text(rng, rng.randint(1, 300))
    if not text:
        return
    assert_valid(split_parts(text), text)


@pytest.mark.parametrize("limit", [50, 120, 333])
def test_small_limits_hold_the_same_invariants(limit):
    rng = random.Random(limit)
    for _ in range(20):
        text = random_text(rng, 40).replace("x" * 30, "x" * 3)
        if text:
            assert_valid(split_parts(text, limit), text, limit)


def test_short_text_is_one_message_unchanged():
    assert split_message("hi there") == ["hi there"]


def test_split_prefers_paragraph_boundaries():
    para = ("word " * 150).strip()  # 749 chars
    text = "\n\n".join([para] * 4)
    parts = split_message(text)
    assert len(parts) == 2
    assert parts[0].endswith("\n\n") and parts[0].count("\n\n") == 2


def test_split_on_lines_when_no_paragraphs():
    line = "a" * 99
    text = "\n".join([line] * 50)  # 4999 chars
    parts = split_message(text)
    assert all(p.endswith("\n") for p in parts[:-1])
    assert all(len(p) <= 2000 for p in parts)


def test_single_long_line_is_hard_split():
    text = "数" * 5000
    parts = split_message(text)
    assert [len(p) for p in parts] == [2000 - 4, 2000 - 4, 5000 - 2 * 1996]
    assert "".join(parts) == text


def test_code_fence_is_closed_and_reopened_with_language():
    code = "\n".join(f"    print({i})  # line {i}" for i in range(200))
    text = "Here is code:\n```python\n" + code + "\n```\nDone."
    parts = split_message(text)
    assert len(parts) >= 3
    assert parts[0].endswith("\n```")
    for p in parts[1:]:
        assert p.startswith("```python\n")
    assert parts[-1].endswith("```\nDone.")


def test_blank_answer_gets_visible_placeholder():
    assert split_message("   \n") == [EMPTY_ANSWER]


def test_streaming_view_shows_cursor_and_stays_within_limit():
    assert streaming_view("") == ["⏳"]
    assert streaming_view("abc") == ["abc" + STREAMING_CURSOR]
    view = streaming_view("a" * 1999)
    assert view == ["a" * 1999]


def test_earlier_parts_are_stable_while_text_grows():
    rng = random.Random(7)
    text = random_text(rng, 400)
    final = split_message(text)
    for end in range(2100, len(text), 997):
        partial = split_message(text[:end])
        assert partial[:-1] == final[: len(partial) - 1]
