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


# ------------------------------------------------------------------ history, checks, repairs


def test_rollback_history_is_a_stack_that_survives_rollbacks_and_repromotions(tmp_path):
    reg = Registry(tmp_path)
    v1, v2, v3 = (add_version(reg, passed=True) for _ in range(3))
    for v in (v2, v3):
        reg.promote(v)
    assert reg.rollback() == v2  # the sequence: /rollback, /rollback v0003, /rollback
    assert reg.rollback(to=v3) == v3
    assert reg.promotion_stack() == [v2, v3]
    assert reg.rollback() == v2
    reg.promote(v1)  # a re-promotion pushes; rollback walks back through it
    assert reg.rollback() == v2


def test_promoted_naming_a_missing_version_is_an_error_not_nothing_promoted(tmp_path):
    reg = Registry(tmp_path)
    add_version(reg, passed=True)
    (tmp_path / "PROMOTED").write_text("v0009\n")
    with pytest.raises(RegistryError, match=r"PROMOTED names 'v0009'.*versions: v0001"):
        reg.promoted()
    with pytest.raises(RegistryError, match="v0009"):
        reg.check()


def test_a_truncated_manifest_is_named_and_does_not_hide_the_other_versions(tmp_path):
    reg = Registry(tmp_path)
    v1, v2, v3 = (add_version(reg, passed=True) for _ in range(3))
    reg.promote(v1)
    reg.promote(v3)
    (tmp_path / v2 / "manifest.json").write_text('{"stage": "anc')
    with pytest.raises(RegistryError, match=rf"{v2}/manifest.json.*manifest of {v2}"):
        reg.get(v2)
    rows = {r["version"]: r for r in reg.describe()}
    assert rows[v2]["status"] == "broken" and "manifest.json" in rows[v2]["error"]
    assert rows[v1]["gate_passed"] is True
    assert reg.rollback() == v1  # other versions roll back as before


def test_a_kill_between_promoted_and_history_is_repaired_at_start(tmp_path):
    reg = Registry(tmp_path)
    v1, v2 = (add_version(reg, passed=True) for _ in range(2))
    reg.promote(v1)
    # SIGKILL after PROMOTED was replaced, before history.jsonl and the manifest were written,
    # with the dead writer's temp file left inside the version directory.
    (tmp_path / "PROMOTED").write_text(v2 + "\n")
    stale = tmp_path / v2 / ".manifest.json.999999999.tmp"
    stale.write_text("{")
    repairs = reg.check()
    assert not stale.exists()
    assert reg.history()[-1]["version"] == v2 and reg.history()[-1]["repaired"] is True
    assert reg.get(v2)["status"] == "promoted" and reg.get(v1)["status"] == "superseded"
    assert reg.promotion_stack() == [v1, v2] and reg.rollback() == v1
    assert len(repairs) == 4
    assert reg.check() == []  # nothing left to repair


def test_only_the_live_version_says_promoted(tmp_path):
    reg = Registry(tmp_path)
    v1, v2 = (add_version(reg, passed=True) for _ in range(2))
    reg.promote(v1)
    reg.promote(v2)
    assert [reg.get(v)["status"] for v in (v1, v2)] == ["superseded", "promoted"]
    assert reg.get(v1)["promoted_at"]  # it was live once
    reg.rollback()
    assert [reg.get(v)["status"] for v in (v1, v2)] == ["promoted", "rolled_back"]


def test_registry_directories_are_private(tmp_path):
    reg = Registry(tmp_path / "adapters")
    v = add_version(reg)
    assert (tmp_path / "adapters").stat().st_mode & 0o777 == 0o700
    assert reg.path(v).stat().st_mode & 0o777 == 0o700


# ------------------------------------------------------------------ the trainer's protocol


def trainer(tmp_path, *args):
    import subprocess
    import sys

    config = tmp_path / "config.yaml"
    if not config.exists():
        base = tmp_path / "base"
        base.mkdir()
        (base / "config.json").write_text("{}")
        config.write_text(f"model:\n  base: {base}\ntraining:\n  registry_dir: {tmp_path / 'reg'}\n")
    out = subprocess.run([sys.executable, "-m", "trainer", *args, "--config", str(config), "--progress", "json"],
                         capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    events = [json.loads(line) for line in out.stdout.splitlines()]
    return out.returncode, events, out.stderr


def test_promote_and_rollback_end_with_exactly_one_done_event(tmp_path):
    code, events, _ = trainer(tmp_path, "list")  # writes the config
    reg = Registry(tmp_path / "reg")
    v1, v2 = (add_version(reg, passed=True) for _ in range(2))
    code, events, _ = trainer(tmp_path, "promote", v1)
    assert code == 0 and events == [{"event": "done", "command": "promote", "version": v1,
                                     "path": str(reg.path(v1).resolve()), "previous": None}]
    trainer(tmp_path, "promote", v2)
    code, events, _ = trainer(tmp_path, "rollback")
    assert code == 0 and [(e["event"], e["version"], e["previous"]) for e in events] == [("done", v1, v2)]
    code, events, stderr = trainer(tmp_path, "rollback")
    assert code == 2 and events == [{"event": "error", "exit_code": 2,
                                     "message": "nothing to roll back to: no earlier promoted version"}]


def test_import_registers_an_outside_peft_adapter_and_refuses_what_the_worker_would(tmp_path, tiny_base):
    """`trainer import` takes an adapter trained elsewhere (ms-swift, PEFT) and refuses, with the
    worker's own words, every adapter the worker would refuse: a promote --force could otherwise
    make it live (issue 29)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.support.adapters import make_adapter

    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  base: {tiny_base}\ntraining:\n  registry_dir: {tmp_path / 'reg'}\n")
    outside = make_adapter(str(tiny_base), tmp_path / "swift-output" / "checkpoint-50", seed=1)
    code, events, _ = trainer(tmp_path, "import", str(outside))
    assert code == 0 and len(events) == 1 and events[0]["event"] == "done" and events[0]["version"] == "v0001"
    reg = Registry(tmp_path / "reg")
    m = reg.get("v0001")
    assert m["stage"] == "imported" and m["source"] == str(outside) and m["status"] == "candidate"
    assert m["base"] == str(tiny_base)
    assert (reg.path("v0001") / "adapter_model.safetensors").read_bytes() == \
        (outside / "adapter_model.safetensors").read_bytes()
    # Owner only, the registry and what it holds (manifests and reports quote users' corrections).
    assert (tmp_path / "reg").stat().st_mode & 0o077 == 0
    assert all(f.stat().st_mode & 0o077 == 0 for f in reg.path("v0001").iterdir())

    def variant(name, edit_config=None, edit_weights=None):
        bad = tmp_path / name
        shutil.copytree(outside, bad)
        if edit_config:
            cfg = json.loads((bad / "adapter_config.json").read_text())
            edit_config(cfg)
            (bad / "adapter_config.json").write_text(json.dumps(cfg))
        if edit_weights:
            weights = load_file(bad / "adapter_model.safetensors")
            edit_weights(weights)
            save_file(weights, bad / "adapter_model.safetensors")
        return bad

    def nan(weights):
        next(iter(weights.values()))[0, 0] = float("nan")

    def other_shape(weights):
        key = next(k for k in weights if "lora_A" in k)
        weights[key] = weights[key][:, :-1].contiguous()

    code, events, stderr = trainer(tmp_path, "import", str(variant("nan", edit_weights=nan)))
    assert code == 2 and "non-finite" in events[-1]["message"] and "Traceback" not in stderr, (events, stderr)
    # The same check, in-process, on the other ways an adapter can be unservable.
    from trainer.cli import _check_servable

    for bad, words in ((variant("shape", edit_weights=other_shape), "shape"),
                       (variant("mts", edit_config=lambda c: c.update(modules_to_save=["lm_head"])), "modules_to_save"),
                       (variant("prefix", edit_config=lambda c: c.update(peft_type="PREFIX_TUNING")), "not a LoRA"),
                       (tmp_path / "nowhere", "not a directory")):
        with pytest.raises(RegistryError, match=words):
            _check_servable(str(bad), tiny_base)
    assert reg.versions() == ["v0001"]


def test_eval_help_explains_version_and_exit_status_3():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "trainer", "eval", "--help"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True).stdout
    assert "--version" in out and "registry version" in out
    assert "3 the gate FAILED" in out


def test_the_fix_the_error_suggests_for_a_missing_promoted_version_works(tmp_path):
    """PROMOTED naming a version that is gone: the error says `rollback --to VERSION`; running
    exactly that (or promote --force) repairs the registry instead of failing the same way."""
    code, _, _ = trainer(tmp_path, "list")  # writes the config
    reg = Registry(tmp_path / "reg")
    v1, v2 = add_version(reg, passed=True), add_version(reg, passed=True)
    reg.promote(v1)
    (tmp_path / "reg" / "PROMOTED").write_text("v0009\n")
    with pytest.raises(RegistryError, match=r"rollback --to VERSION"):
        reg.promoted()
    code, events, stderr = trainer(tmp_path, "rollback", "--to", v1)
    assert code == 0 and events[-1]["version"] == v1, (events, stderr[-2000:])
    assert reg.promoted() == v1
    (tmp_path / "reg" / "PROMOTED").write_text("v0009\n")
    code, events, stderr = trainer(tmp_path, "promote", v2, "--force")
    assert code == 0 and reg.promoted() == v2, (events, stderr[-2000:])
