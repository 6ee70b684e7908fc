"""The adapter registry: versions appear whole, promotion is gated, rollback goes back."""

from __future__ import annotations

import json
import os

import pytest

from trainer.registry import Registry, RegistryError


def fake_adapter(reg: Registry) -> os.PathLike:
    """A staging dir holding the two files of a PEFT adapter (contents irrelevant here)."""
    staging = reg.new_staging_dir()
    (staging / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (staging / "adapter_model.safetensors").write_bytes(b"\0")
    return staging


def add_version(reg: Registry, stage="anchor", parent=None, passed=None) -> str:
    v = reg.commit(fake_adapter(reg), {"stage": stage, "parent": parent, "base": "/base"})
    if passed is not None:
        reg.update(v, gate={"passed": passed})
    return v


def test_versions_are_numbered_and_carry_a_manifest(tmp_path):
    reg = Registry(tmp_path / "adapters")
    assert reg.versions() == [] and reg.promoted() is None
    v1, v2 = add_version(reg), add_version(reg, "generalize", parent="v0001")
    assert (v1, v2) == ("v0001", "v0002")
    m = reg.get(v2)
    assert m["version"] == "v0002" and m["parent"] == "v0001" and m["status"] == "candidate" and m["created_at"]
    assert (reg.path(v2) / "adapter_config.json").is_file()


def test_unevaluated_or_failed_versions_cannot_be_promoted_without_force(tmp_path):
    reg = Registry(tmp_path)
    v1 = add_version(reg)
    v2 = add_version(reg, passed=False)
    with pytest.raises(RegistryError, match="not been evaluated"):
        reg.promote(v1)
    with pytest.raises(RegistryError, match="gate failed"):
        reg.promote(v2)
    assert reg.promoted() is None
    reg.promote(v2, force=True)
    assert reg.promoted() == v2
    assert reg.history()[-1]["forced"] is True


def test_rollback_returns_to_the_previously_promoted_version_step_by_step(tmp_path):
    reg = Registry(tmp_path)
    v1, v2, v3 = (add_version(reg, passed=True) for _ in range(3))
    for v in (v1, v2, v3):
        reg.promote(v)
    assert reg.rollback() == v2 and reg.promoted() == v2
    assert reg.get(v3)["status"] == "rolled_back"
    assert reg.rollback() == v1 and reg.promoted() == v1
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    assert reg.rollback(to=v3) == v3
    actions = [(e["action"], e["version"]) for e in reg.history()]
    assert actions == [("promote", v1), ("promote", v2), ("promote", v3),
                       ("rollback", v2), ("rollback", v1), ("rollback", v3)]
    assert all(e["at"] for e in reg.history())


def test_unknown_version_is_named_in_the_error(tmp_path):
    reg = Registry(tmp_path)
    add_version(reg)
    with pytest.raises(RegistryError, match=r"no adapter version 'v0042'.*v0001"):
        reg.promote("v0042")


def test_half_written_versions_are_invisible_and_cleaned_up(tmp_path):
    reg = Registry(tmp_path)
    v1 = add_version(reg, passed=True)
    reg.promote(v1)
    # A run that died mid-write: its staging dir (dead pid) and a torn history line.
    dead = tmp_path / ".staging-999999999-0"
    dead.mkdir()
    (dead / "adapter_config.json").write_text("{")
    with open(tmp_path / "history.jsonl", "a") as fh:
        fh.write('{"action": "prom')
    assert reg.versions() == [v1] and reg.promoted() == v1
    assert len(reg.history()) == 1
    with pytest.raises(RegistryError, match="adapter incomplete"):
        reg.commit(reg.new_staging_dir(), {"stage": "anchor"})
    assert not dead.exists()  # new_staging_dir removed the dead run's leftovers
    assert reg.versions() == [v1]


def test_registry_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, trainer.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"
