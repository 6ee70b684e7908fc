"""Batched greedy generation and per-sample loss, for the evaluation gate (torch edge)."""

from __future__ import annotations

from typing import Sequence

from trainer.datasets import Messages
from trainer.encode import IGNORE_INDEX, encode, prompt_ids
from trainer.sft import collate

EVAL_BATCH_SIZE = 32


def greedy_answers(model, tokenizer, prompts: Sequence[Messages], max_new_tokens: int,
                   batch_size: int = EVAL_BATCH_SIZE) -> list[str]:
    """Greedy replies to each prompt (left-padded batches; special tokens stripped)."""
    return [text for text, _ in greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size)]


def greedy_replies(model, tokenizer, prompts: Sequence[Messages], max_new_tokens: int,
                   batch_size: int = EVAL_BATCH_SIZE) -> list[tuple[str, bool]]:
    """(greedy reply, whether it ended on its own before max_new_tokens) for each prompt."""
    import torch

    from model.loading import eos_token_ids

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    replies: list[tuple[str, bool]] = []
    for i in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, p) for p in prompts[i : i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for j, x in enumerate(ids):
            input_ids[j, width - len(x):] = torch.tensor(x)
            mask[j, width - len(x):] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            )
        for row in out[:, width:]:
            ended = any(int(t) in eos_ids for t in row)
            replies.append((tokenizer.decode(row, skip_special_tokens=True).strip(), ended))
    return replies


def mean_answer_loss(model, tokenizer, samples: Sequence[Messages], max_length: int,
                     batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Token-weighted mean cross-entropy on the assistant tokens of `samples` (batched by
    length, the output layer applied only to answer tokens, as in training)."""
    import torch

    from trainer.sft import answer_loss

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    encoded = sorted((encode(tokenizer, s, max_length) for s in samples), key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        ids, mask, labels = collate(encoded[i : i + batch_size], pad, device)
        with torch.no_grad():
            total += float(answer_loss(model, ids, mask, labels, reduction="sum"))
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)
