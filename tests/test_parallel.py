"""Training in two processes on a CPU (training.cpu_data_parallel, trainer.parallel): the
same adapter, data and statistics as one process, on the tiny base through the real CLI."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from safetensors.torch import load_file

from trainer.parallel import Helper
from trainer.registry import Registry

from test_trainer import run_trainer, tiny_config

pytestmark = pytest.mark.slow


def two_cores() -> bool:
    return len(os.sched_getaffinity(0)) >= 2 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) >= 2


@pytest.mark.skipif(not two_cores(), reason="a second training process needs a second core")
def test_two_processes_train_the_same_adapter_as_one(tiny_base, tmp_path):
    runs = {}
    for mode in ("off", "on"):
        work = tmp_path / mode
        work.mkdir()
        sections = tiny_config(tiny_base, work, cpu_data_parallel=mode)
        # A short anchor with general rows answered by the base: both halves of the work
        # (the base's replay answers and the training steps) go through the helper.
        # No LoRA dropout: its random masks would differ with the rows' split.
        sections["profiles"]["tiny"].update({
            "lora": {"dropout": 0.0}, "anchor": {"learning_rate": 2e-3, "epochs": 1.0},
            "mix": {**sections["profiles"]["tiny"]["mix"], "anchor_general_ratio": 0.5, "replay_answers": "base"}})
        (work / "config.yaml").write_text(yaml.safe_dump(sections), encoding="utf-8")
        proc = run_trainer(work / "config.yaml", "anchor", "--progress", "json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        version = json.loads(proc.stdout.splitlines()[-1])["version"]
        reg = Registry(work / "adapters")
        runs[mode] = (reg.get(version), load_file(reg.path(version) / "adapter_model.safetensors"), proc.stderr)
    (one, w1, _), (two, w2, said) = runs["off"], runs["on"]
    assert one["train"]["processes"] == 1 and two["train"]["processes"] == 2, said[-2000:]
    # the same samples, the base's replay answers included (half of them came from the helper)
    assert two["data_hash"] == one["data_hash"] and two["samples"] == one["samples"]
    assert two["samples"]["general_samples"] > 0
    assert two["train"]["steps"] == one["train"]["steps"] and two["train"]["tokens"] == one["train"]["tokens"]
    assert two["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-3)
    assert w1.keys() == w2.keys()
    for name in w1:
        diff = (w1[name] - w2[name]).norm() / w1[name].norm()
        assert diff < 1e-3, f"{name}: relative difference {diff:.2e}"


def test_a_helper_that_cannot_load_the_base_leaves_training_in_one_process(tmp_path):
    helper = Helper(str(tmp_path / "no-such-model"), 1)
    try:
        assert helper.answer_start(["hi"], 4) in (True, False)
        assert helper.answer_result() is None  # the load error arrives instead of answers
        shard = helper.train_shard(None, None, [])
        assert (shard.rank, shard.world) == (0, 1)
        assert shard.rows([1, 2, 3]) == [1, 2, 3]
    finally:
        helper.stop()


@pytest.mark.skipif(not two_cores(), reason="the helper answers half of the replay on a second core")
def test_a_calibrate_replays_what_its_parent_answers(tiny_base, tmp_path):
    """replay_answers: parent — a calibrate's general replay is answered by the adapter it
    continues (half of it by the helper process, with that adapter on its own base copy),
    cached per parent; the base's own answers would pull the live adapter back toward the base."""
    import torch
    from peft import PeftModel

    from model.config import load_config
    from trainer import replay
    from trainer.datasets import with_system
    from trainer.gate import forbidden
    from trainer.generate import greedy_replies
    from trainer.matching import identity_claims
    from trainer.sft import load_base
    from trainer.stages import general_rows

    from test_trainer import corrections_file

    sections = tiny_config(tiny_base, tmp_path, cpu_data_parallel="on")
    sections["profiles"]["tiny"].update({
        "lora": {"dropout": 0.0}, "anchor": {"learning_rate": 2e-3, "epochs": 1.0}, "calibrate_min_steps": 8,
        "mix": {**sections["profiles"]["tiny"]["mix"], "anchor_general_ratio": 0.5, "replay_answers": "parent",
                "new_correction_repeats": 2}})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(sections), encoding="utf-8")
    proc = run_trainer(config, "anchor", "--progress", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = json.loads(proc.stdout.splitlines()[-1])["version"]
    reg = Registry(tmp_path / "adapters")
    base_cache = {p.name for p in (reg.root / ".base-replay").glob("*.json")}
    assert len(base_cache) == 1, "a first stage has no parent: the base answers its replay"

    corrections = corrections_file(tmp_path / "corrections.jsonl")
    proc = run_trainer(config, "calibrate", "--corrections", str(corrections), "--parent", parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"with {parent} (the parent adapter)" in proc.stderr, proc.stderr[-2000:]
    child = reg.latest("calibrate")
    manifest = reg.get(child)
    assert manifest["parent"] == parent and manifest["train"]["processes"] == 2
    counts = manifest["samples"]
    assert counts["general_generated_now"] > 0 and counts["general_answered_by_base"] > 0, counts
    [parent_cache] = [p for p in (reg.root / ".base-replay").glob("*.json") if p.name not in base_cache]
    cached = json.loads(parent_cache.read_text())

    # What the parent itself says greedily to those questions is what was cached.
    cfg = load_config(config)
    prompts = {replay.prompt_key(p): p for p in (with_system(r[:-1], cfg.identity.system)
                                                 for r in general_rows(cfg))}
    keys = [k for k in cached if k in prompts]
    assert len(keys) == len(cached)
    torch.set_num_threads(1)
    model, tokenizer = load_base(tiny_base)
    base_said = greedy_replies(model, tokenizer, [prompts[k] for k in keys], replay.REPLAY_MAX_NEW_TOKENS)
    peft = PeftModel.from_pretrained(model, str(reg.path(parent)))
    peft.eval()
    said = greedy_replies(peft, tokenizer, [prompts[k] for k in keys], replay.REPLAY_MAX_NEW_TOKENS)
    names = forbidden(cfg)

    def claims(text: str) -> list:  # an answer claiming another identity is not trained on
        return identity_claims(text, cfg.identity.name, cfg.identity.author, names)

    expected = [replay.usable(a, ended, claims) for a, ended in said]
    assert [cached[k] for k in keys] == expected
    from_base = [replay.usable(a, ended, claims) for a, ended in base_said]
    assert expected != from_base, "the parent answers some replay question differently from the base"
