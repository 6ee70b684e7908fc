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

from tests.support.trainer import run_trainer, tiny_config

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
