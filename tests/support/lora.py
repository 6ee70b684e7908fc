"""Random tiny models with LoRA on every linear layer, for the fused-LoRA and shared-prefix tests."""

from __future__ import annotations

import torch

from tests.support.engine import ARCHS
from trainer import sft


def hyper(**kw):
    """The training hyperparameters of these tests (LoRA r 4, all linear layers); `kw` overrides."""
    base = dict(learning_rate=1e-3, epochs=1, batch_size=2, grad_accum=1, warmup_ratio=0.0, max_length=256, seed=3,
                gradient_checkpointing=False, lora_r=4, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    base.update(kw)
    return sft.Hyper(**base)


def lora_model(tok, arch, **kw):
    """A random `arch` model with LoRA on all linear layers, B given values (B = 0 would carry no signal)."""
    model = sft.with_lora(ARCHS[arch](tok), hyper(**kw))
    with torch.no_grad():  # B starts at zero: give it values so every gradient path carries signal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()
