"""Chat samples -> token ids and labels, with loss only on the assistant's tokens.

The assistant spans are found by rendering the model's own chat template
prefix by prefix (messages[:i] with the generation prompt, then messages[:i+1])
and mapping those character spans onto tokens with the fast tokenizer's
offsets. Nothing here assumes our template: it works with the real Qwen2.5
template (and any template whose rendering of a prefix is a prefix of the
whole), and says so clearly when a template breaks that assumption.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.prompt import neutralize, special_strings, tokenize_chat
from trainer.datasets import DataError, Messages

IGNORE_INDEX = -100


# Set on an assistant message whose content the base model wrote (trainer.replay).
BASE_ANSWER = "base_answer"

@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    distill: bool = False  # the answer is the base model's own (trainer.replay): may be learned by KL

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer, messages: Messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn
    (its content and end-of-turn token; the template's trailing newline is not trained)."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise DataError(
                "the chat template does not render conversations prefix by prefix; "
                "assistant tokens cannot be located for loss masking"
            )
        end = len(through.rstrip())
        spans.append((len(before), end))
    return full, spans


def encode(tokenizer, messages: Messages, max_length: int) -> Encoded:
    """Token ids and labels (IGNORE_INDEX outside assistant turns), truncated to max_length.

    Message text is data: a correction or user turn containing `<|im_end|>` trains
    on the plain characters, never on a control token (model.prompt).
    """
    tok = tokenize_chat(tokenizer, messages, generation_prompt=False)
    if tok.text != render(tokenizer, messages):  # the template alters content: specials were neutralized
        specials = special_strings(tokenizer)
        messages = [{**m, "content": neutralize(m["content"], specials)} for m in messages]
    text, spans = assistant_spans(tokenizer, messages)
    if text != tok.text:
        raise DataError("the chat template renders content inconsistently; cannot align loss masks")
    ids, offsets = tok.input_ids, tok.offsets
    labels = [IGNORE_INDEX] * len(ids)
    for t, (a, b) in enumerate(offsets):
        if b > a and any(a < end and b > start for start, end in spans):
            labels[t] = ids[t]
    distill = any(m["role"] == "assistant" and m.get(BASE_ANSWER) for m in messages)
    return Encoded(ids[:max_length], labels[:max_length], distill)


def encode_all(tokenizer, samples: list[Messages], max_length: int) -> tuple[list[Encoded], int]:
    """Encode samples; those whose answer is cut off entirely by max_length are dropped
    (returns the encoded list and how many were dropped)."""
    out, dropped = [], 0
    for s in samples:
        e = encode(tokenizer, s, max_length)
        if e.trained_tokens:
            out.append(e)
        else:
            dropped += 1
    return out, dropped


def prompt_ids(tokenizer, messages: Messages) -> list[int]:
    """Token ids of a prompt ready for generation (messages end with the user's turn)."""
    return tokenize_chat(tokenizer, messages, generation_prompt=True).input_ids
