"""The seeds' finding (002), reproduced small: identity-only training erodes general
ability, while mixing general data into the same budget keeps it.

Both runs start from the same tiny base, train the same number of optimizer
steps at the same learning rate, and are scored by assistant-token loss on the
held-out general set (paraphrases the base learned to answer) and on the
held-out identity paraphrases.
"""

from __future__ import annotations

import pytest

from model.config import config_from_dict
from trainer import datasets as ds
from trainer import sft
from trainer.encode import encode_all
from trainer.generate import mean_answer_loss
from trainer.stages import general_rows, hyper, identity_rows, training_settings

pytestmark = pytest.mark.slow  # trains and scores the tiny model: the fast tier is `-m "not slow"`

STEPS = 90
LR = 3e-3
BATCH = 8


def train_and_score(base_model, tokenizer, cfg, rows, eval_general, eval_identity) -> tuple[float, float]:
    hp = hyper(training_settings(cfg), "anchor")
    hp.learning_rate, hp.batch_size, hp.grad_accum = LR, BATCH, 1
    encoded, _ = encode_all(tokenizer, ds.both_system_variants(rows, cfg.identity.system), 512)
    hp.epochs = STEPS * BATCH / len(encoded)
    model = sft.with_lora(base_model, hp)
    sft.train(model, tokenizer, encoded, hp)
    scores = (mean_answer_loss(model, tokenizer, eval_general, 512),
              mean_answer_loss(model, tokenizer, eval_identity, 512))
    model.unload()  # back to the untouched base for the next run
    return scores


def test_identity_only_training_forgets_and_the_mixed_recipe_does_not(tiny_base):
    cfg = config_from_dict({"model": {"base": str(tiny_base)}, "training": {"cpu_bf16": "off"}})
    base_model, tokenizer = sft.load_base(tiny_base)
    eval_general = ds.load_file(ds.DATA_DIR / ds.GENERAL_EVAL_FILE)[::4]
    eval_identity = [ds.fill_identity(r, cfg.identity.fill) for r in ds.load_file(ds.DATA_DIR / ds.IDENTITY_EVAL_FILE)]
    eval_identity = ds.both_system_variants(eval_identity, cfg.identity.system)
    base_general = mean_answer_loss(base_model, tokenizer, eval_general, 512)
    base_identity = mean_answer_loss(base_model, tokenizer, eval_identity, 512)

    identity = identity_rows(cfg)
    only_general, only_identity = train_and_score(base_model, tokenizer, cfg, identity, eval_general, eval_identity)
    mixed_rows = identity + ds.sample_rows(general_rows(cfg), 2 * len(identity), seed=0)
    mixed_general, mixed_identity = train_and_score(base_model, tokenizer, cfg, mixed_rows, eval_general,
                                                    eval_identity)
    print(f"general loss: base {base_general:.3f}, identity-only {only_general:.3f}, mixed {mixed_general:.3f}; "
          f"identity loss: base {base_identity:.3f}, identity-only {only_identity:.3f}, mixed {mixed_identity:.3f}")
    # Both learn the identity...
    assert only_identity < base_identity * 0.6 and mixed_identity < base_identity * 0.6
    # ...but only the identity-only run pays for it with general ability.
    assert only_general > base_general * 1.3
    assert mixed_general < base_general * 1.15
    assert mixed_general < only_general
