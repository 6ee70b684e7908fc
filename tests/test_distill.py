"""Base-answered replay learned by distillation (training.mix.replay_loss: distill), on the
tiny base: a replay row then costs the KL divergence from the base's own next-token
distribution, which is zero while the adapter changes nothing and grows as it drifts."""

from __future__ import annotations

import torch

from trainer import datasets as ds
from trainer import sft
from trainer.encode import BASE_ANSWER, encode
from trainer.replay import answered_by_base

SYSTEM = "You are Loopcord, an AI assistant created by the Loopcord community."
ROWS = [[{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Name the capital city of France."}, {"role": "assistant", "content": "Paris."}]]


def hyper(**kw) -> sft.Hyper:
    return sft.Hyper(learning_rate=1e-3, epochs=1, batch_size=2, grad_accum=1, warmup_ratio=0.0, max_length=256,
                     seed=1, gradient_checkpointing=False, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                     target_modules="all-linear", **kw)


def test_only_answers_the_base_wrote_are_marked_for_distillation(tiny_base, tmp_path):
    _, tokenizer = sft.load_base(tiny_base, device="cpu")
    replies = iter([("Four.", True), ("", True)])  # the second: empty, so the dataset's answer stays
    samples, _ = answered_by_base(ROWS, SYSTEM, tmp_path / "cache.json",
                                  lambda prompts: [next(replies) for _ in prompts], lambda a: [], lambda m: None)
    marked = [encode(tokenizer, s, 256).distill for s in samples]
    assert marked == [True, False]
    assert samples[0][-1] == {"role": "assistant", "content": "Four.", BASE_ANSWER: True}
    # the marker is not text: the rendered conversation is the same without it
    plain = [{k: v for k, v in m.items() if k != BASE_ANSWER} for m in samples[0]]
    assert encode(tokenizer, plain, 256).input_ids == encode(tokenizer, samples[0], 256).input_ids


def test_distilled_rows_cost_nothing_until_the_adapter_drifts_and_then_pull_it_back(tiny_base):
    model, tokenizer = sft.load_base(tiny_base, device="cpu")
    model = sft.with_lora(model, hyper())
    batch = [encode(tokenizer, ds.with_system(r, SYSTEM), 256) for r in ROWS]
    ids, mask, labels = sft.collate(batch, tokenizer.pad_token_id, "cpu")
    everything = torch.tensor([True, True])
    # A fresh LoRA (B = 0) is the base itself: no divergence, while the answers' own
    # cross-entropy is well above zero.
    with torch.no_grad():
        assert float(sft.answer_loss(model, ids, mask, labels, distill_rows=everything)) < 1e-6
        assert float(sft.answer_loss(model, ids, mask, labels)) > 0.1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    drifted = sft.answer_loss(model, ids, mask, labels, distill_rows=everything)
    assert float(drifted) > 1e-3
    drifted.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    # A small step: at 0.05 plain SGD overshoots on some tiny bases (trained on another CPU) and the
    # KL climbs again after its first drop.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005)
    for _ in range(5):  # descending the KL moves the adapted model back toward the base
        opt.step()
        opt.zero_grad()
        loss = sft.answer_loss(model, ids, mask, labels, distill_rows=everything)
        loss.backward()
    assert float(loss) < 0.7 * float(drifted)
    # One row distilled, one learned as text: the sum is each row's own loss added up.
    one = torch.tensor([True, False])
    with torch.no_grad():
        mixed = float(sft.answer_loss(model, ids, mask, labels, reduction="sum", distill_rows=one))
        kl_first = float(sft.answer_loss(model, ids[:1], mask[:1], labels[:1], reduction="sum",
                                         distill_rows=one[:1]))
        ce_second = float(sft.answer_loss(model, ids[1:], mask[1:], labels[1:], reduction="sum"))
    assert abs(mixed - (kl_first + ce_second)) < 1e-3 * max(1.0, mixed)
