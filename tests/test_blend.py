"""training.calibrate_blend: a calibrate keeps only a share of its change over the parent
(parent + blend x (trained - parent), WiSE-FT), on the tiny base through the real CLI."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from trainer.registry import Registry

from tests.support.trainer import corrections_file, run_trainer, tiny_config

pytestmark = pytest.mark.slow


def test_a_blended_calibrate_is_the_parent_plus_that_share_of_the_trained_change(tiny_base, tmp_path):
    sections = tiny_config(tiny_base, tmp_path, cpu_data_parallel="off")
    sections["profiles"]["tiny"].update({"anchor": {"learning_rate": 2e-3, "epochs": 1.0}, "calibrate_min_steps": 8})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(sections), encoding="utf-8")
    proc = run_trainer(config, "anchor", "--progress", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = json.loads(proc.stdout.splitlines()[-1])["version"]
    corrections = corrections_file(tmp_path / "corrections.jsonl")
    reg = Registry(tmp_path / "adapters")

    versions = {}
    for blend in (1.0, 0.25):
        sections["profiles"]["tiny"]["calibrate_blend"] = blend
        config.write_text(yaml.safe_dump(sections), encoding="utf-8")
        proc = run_trainer(config, "calibrate", "--corrections", str(corrections), "--parent", parent,
                           "--progress", "json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        versions[blend] = json.loads(proc.stdout.splitlines()[-1])["version"]

    def weights(version):
        return load_file(reg.path(version) / "adapter_model.safetensors")

    p, full, quarter = weights(parent), weights(versions[1.0]), weights(versions[0.25])
    assert reg.get(versions[0.25])["train"]["blend"] == 0.25 and "blend" not in reg.get(versions[1.0])["train"]
    moved = 0
    for name in p:
        expected = p[name] + 0.25 * (full[name] - p[name])
        assert (quarter[name] - expected).abs().max() <= 1e-6 * (1 + expected.abs().max()), name
        moved += int(not full[name].equal(p[name]))
    assert moved, "training changed the adapter"


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_a_blend_outside_zero_to_one_is_refused_with_the_key(value):
    from model.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="calibrate_blend"):
        config_from_dict({"training": {"calibrate_blend": value}})
