"""Training runs a batch's common leading tokens (the identity system prompt) once.

For Llama and Qwen2: the loss and every LoRA gradient of a padded batch whose rows share a
system prompt equal those of the plain whole-batch forward (also with rows answered by the
base, which take the KL path), the shared tokens go through the model as one row, and where
sharing would change the arithmetic (LoRA dropout, gradient checkpointing) or nothing is
shared, the plain forward runs.
"""

from __future__ import annotations

import pytest
import torch

from trainer import sft
from trainer.encode import IGNORE_INDEX, Encoded

from tests.support.engine import ARCHS
from tests.support.lora import hyper, lora_model  # LoRA r 4 on all linear layers, B given values

SYSTEM = "system: you are a helpful assistant made by the community, truthful and concise"
QUESTIONS = [("who are you", "i am the assistant"), ("numbers: 1 2 3", "4 5 6 7"),
             ("the quick brown fox jumps over the lazy dog", "and more words follow here"),
             ("你好", "hello world how are you today")]


def _samples(tok, distill=(False, False, False, False)):
    prefix = tok(SYSTEM)["input_ids"]
    out = []
    for (q, a), d in zip(QUESTIONS, distill):
        question, answer = tok(" " + q)["input_ids"], tok(" " + a)["input_ids"]
        ids = prefix + question + answer
        out.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] * (len(prefix) + len(question)) + answer,
                           distill=d))
    return out


def _run(model, tok, samples, share: bool):
    """Loss, LoRA gradients, and the [rows, tokens] shapes the embedding layer saw."""
    ids, mask, labels = sft.collate(samples, tok.pad_token_id, torch.device("cpu"))
    rows = sft.distill_rows(samples, ids.device) if any(e.distill for e in samples) else None
    seen = []
    embed = model.get_base_model().model.embed_tokens
    hook = embed.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    try:
        model.zero_grad(set_to_none=True)
        loss = sft.answer_loss(model, ids, mask, labels, distill_rows=rows, share_prefix=share)
        loss.backward()
    finally:
        hook.remove()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}, seen


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("distill", [False, True])
def test_shared_system_prompt_gives_the_same_loss_and_gradients(tokenizer, arch, distill):
    samples = _samples(tokenizer, (False, True, False, True) if distill else (False,) * 4)
    prefix = len(tokenizer(SYSTEM)["input_ids"])
    assert len({len(e.input_ids) for e in samples}) > 1  # rows of different lengths: padding in the batch
    model = lora_model(tokenizer, arch)
    plain_loss, plain, plain_seen = _run(model, tokenizer, samples, False)
    shared_loss, shared, shared_seen = _run(model, tokenizer, samples, True)
    width = max(len(e.input_ids) for e in samples)
    assert plain_seen[0] == (4, width)
    # the system prompt (and whatever more all rows share) once, then each row's own tokens
    n = shared_seen[0][1]
    assert shared_seen[0][0] == 1 and n >= prefix and shared_seen[1] == (4, width - n)
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain.keys() == shared.keys() and len(plain) > 0
    for k in plain:
        torch.testing.assert_close(shared[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_training_run_with_shared_prefixes_ends_with_the_same_adapter(tokenizer):
    adapters = {}
    for share in (False, True):
        model = lora_model(tokenizer, "qwen2")
        stats = sft.train(model, tokenizer, _samples(tokenizer), hyper(epochs=3, batch_size=4, shared_prefix=share))
        adapters[share] = (stats["final_loss"], sft.lora_state(model))
    assert adapters[True][0] == pytest.approx(adapters[False][0], rel=1e-4)
    for k, v in adapters[False][1].items():
        torch.testing.assert_close(adapters[True][1][k], v, rtol=1e-3, atol=1e-5, msg=k)


def test_sharing_that_would_change_the_arithmetic_runs_the_plain_forward(tokenizer):
    samples = _samples(tokenizer)
    width = max(len(e.input_ids) for e in samples)
    # LoRA dropout: one shared pass would give every row the same dropout mask
    _, _, seen = _run(lora_model(tokenizer, "llama", lora_dropout=0.3), tokenizer, samples, True)
    assert seen == [(4, width)]
    # gradient checkpointing turns the key/value cache off
    model = lora_model(tokenizer, "llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    _, _, seen = _run(model, tokenizer, samples, True)
    assert seen == [(4, width)]


def test_shared_prefix_length(tokenizer):
    def length(rows):
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return sft.shared_prefix_length(ids, mask)

    common = list(range(10, 22))  # 12 tokens
    assert length([common + [1, 2], common + [3], common + [4, 5, 6]]) == 12
    assert length([common + [1, 2]]) == 0  # one row: nothing to share
    assert length([common[:7] + [1, 2], common[:7] + [3, 4]]) == 0  # under MIN_SHARED_PREFIX
    assert length([[1] + common, [2] + common]) == 0  # the first token differs
    # a row that is all prefix keeps its last token to itself
    assert length([common, common + [1, 2]]) == 11
    # padding never counts as shared, even where the pad id equals a row's token
    assert length([common[:9], common[:9] + [0, 0, 7]]) == 8
