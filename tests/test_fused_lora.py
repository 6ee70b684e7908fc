"""Training through trainer.fused_lora computes what peft's LoRA layers compute.

For Llama and Qwen2 (biased q/k/v): the loss and every LoRA gradient of a padded batch
equal peft's, a short `sft.train` run ends with the same adapter, and the cases it does not
cover (LoRA dropout, adapters switched off for the base's own answers) run peft's forward.
"""

from __future__ import annotations

import pytest
import torch

from trainer import sft
from trainer.encode import IGNORE_INDEX, Encoded
from trainer.fused_lora import fused_lora

from tests.support.engine import ARCHS, prompts
from tests.support.lora import hyper, lora_model


def _samples(tok):
    out = []
    for ids in prompts(tok):
        half = len(ids) // 2
        out.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] * half + ids[half:]))
    return out


def _loss_and_grads(model, tok, fused: bool):
    ids, mask, labels = sft.collate(_samples(tok), tok.pad_token_id, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    if fused:
        with fused_lora(model) as n:
            assert n > 0
            loss = sft.answer_loss(model, ids, mask, labels)
            loss.backward()
    else:
        loss = sft.answer_loss(model, ids, mask, labels)
        loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_loss_and_lora_gradients_equal_peft(tokenizer, arch):
    model = lora_model(tokenizer, arch)
    plain_loss, plain = _loss_and_grads(model, tokenizer, fused=False)
    fused_loss, fused = _loss_and_grads(model, tokenizer, fused=True)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain.keys() == fused.keys() and len(plain) > 0
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)
    # and the fused node is what ran: a projection's output comes from it, not from peft's add
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    with fused_lora(model):
        assert "LoraLinear" in type(layer(x).grad_fn).__name__
    assert "forward" not in layer.__dict__ and "LoraLinear" not in type(layer(x).grad_fn).__name__


def test_a_training_run_ends_with_the_same_adapter(tokenizer):
    adapters = {}
    for fused in (False, True):
        model = lora_model(tokenizer, "qwen2")
        stats = sft.train(model, tokenizer, _samples(tokenizer), hyper(epochs=3, fused_lora=fused))
        adapters[fused] = (stats["final_loss"], sft.lora_state(model))
    assert adapters[True][0] == pytest.approx(adapters[False][0], rel=1e-4)
    for k, v in adapters[False][1].items():
        torch.testing.assert_close(adapters[True][1][k], v, rtol=1e-3, atol=1e-5, msg=k)


def test_what_it_does_not_cover_runs_peft(tokenizer):
    model = lora_model(tokenizer, "llama", lora_dropout=0.5)  # random masks: peft's own forward
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    x = torch.randn(2, 3, layer.in_features)
    with fused_lora(model):
        assert "LoraLinear" not in type(layer(x).grad_fn).__name__
    model = lora_model(tokenizer, "llama")
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    with fused_lora(model), model.disable_adapter():  # the base's own answers: the bare base layer
        torch.testing.assert_close(layer(x), layer.base_layer(x))
