"""config.yaml: the shipped file is slim and valid, docs/CONFIGURATION.md is the reference the
schema renders; a profile sits between the defaults and the file; bad files stop with one line
naming the key; `python -m bot config` shows what a run uses."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from model.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent


def _leaf_keys(cls, prefix=""):
    for name, info in cls.model_fields.items():
        key = f"{prefix}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _leaf_keys(info.annotation, key + ".")
        else:
            yield key


def _has_key(data, dotted):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _file_keys(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _file_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_shipped_config_documents_every_key_and_loads():
    from model.config import default_profiles

    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    cfg = load_config(ROOT / "config.yaml")
    assert isinstance(cfg, Config)
    # Slim: only what an admin sets, each key with its comment; the rest is in the reference.
    key_lines = [line for line in text.splitlines() if re.match(r"\s*[\w-]+:\s*[^\s#]", line)]
    assert len(key_lines) <= 40, f"config.yaml has {len(key_lines)} key: value lines (at most 40)"
    assert "docs/CONFIGURATION.md" in text
    data = yaml.safe_load(text)
    leaves = set(_leaf_keys(Config))
    unknown = [k for k in _file_keys(data) if k not in leaves]
    assert not unknown, f"config.yaml holds keys that are not config keys: {unknown}"
    assert "profiles" not in data  # built in; docs/CONFIGURATION.md shows them
    # A training.* key written in the file wins over the profile: the shipped file must write
    # none a built-in profile sets, or it would quietly switch that part of the profile off.
    profile_keys = {f"training.{k}" for p in default_profiles().values() for k in _file_keys(p)}
    pinned = [k for k in _file_keys(data) if k in profile_keys]
    assert not pinned, f"config.yaml writes training keys that override the profiles: {pinned}"
    assert cfg.profiles == default_profiles()
    # Every value the file writes is the default (the schema owns them).
    assert cfg.model_dump() == config_from_dict({}).model_dump()
    assert cfg.training_for("cpu-small") == config_from_dict({}).training_for("cpu-small")
    # The key reference is docs/CONFIGURATION.md (the README points there), rendered from the
    # schema: the file is exactly what the schema says, one table row per key.
    from model.config import reference_markdown

    reference = (ROOT / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    assert reference == reference_markdown(), \
        "docs/CONFIGURATION.md differs from the schema: python -m bot config --reference > docs/CONFIGURATION.md"
    undocumented = [k for k in _leaf_keys(Config) if f"| `{k}` |" not in reference]
    assert not undocumented, f"docs/CONFIGURATION.md does not list: {undocumented}"
    # ... and it shows the built-in profiles as they are.
    block = re.search(r"```yaml\n(profiles:.*?)```", reference, re.S)
    assert block and yaml.safe_load(block.group(1))["profiles"] == default_profiles()


def test_training_keys_the_file_writes_win_over_the_profile(tmp_path):
    """defaults < profile < the user's file: an admin's learning rate or batch size is not
    replaced by cpu-small's; the keys the file leaves out come from the profile."""
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  profile: cpu-small\n  calibrate:\n    learning_rate: 0.01\n  batch_size: 3\n",
                    encoding="utf-8")
    cfg = load_config(path)
    t = cfg.training_for("cpu-small")
    assert (t.calibrate.learning_rate, t.batch_size) == (0.01, 3)
    # Not written: the profile's (a mapping merges key by key), then the defaults.
    assert (t.calibrate_blend, t.grad_accum, t.max_length, t.lora.dropout) == (0.85, 1, 512, 0.0)
    assert (t.calibrate.epochs, t.anchor.learning_rate, t.mix.rewordings) == (2.0, 4e-4, 4)
    assert (t.warmup_ratio, t.lora.r, t.profile) == (0.05, 8, "cpu-small")
    # The file's keys win under every profile, and cfg.training is defaults + the file.
    assert cfg.training_for("seeds-7b").batch_size == 3 and cfg.training.calibrate.learning_rate == 0.01
    assert cfg.training.calibrate_blend == 1.0
    # A key the file writes is not checked against the profile's value it replaces.
    ok = config_from_dict({"profiles": {"mine": {"batch_size": 0}}, "training": {"batch_size": 2}})
    assert ok.training_for("mine").batch_size == 2


def test_auto_on_a_cpu_applies_cpu_small_when_the_file_sets_no_training_keys(tmp_path):
    from model.config import TrainingConfig, default_profiles

    path = tmp_path / "config.yaml"
    path.write_text("identity:\n  name: Ada\n", encoding="utf-8")
    for cfg in (load_config(path), config_from_dict({}), config_from_dict({"training": {"profile": "auto"}})):
        name = cfg.profile_name(on_gpu=False)
        assert name == "cpu-small"
        t = cfg.training_for(name)
        small = default_profiles()["cpu-small"]
        assert (t.batch_size, t.grad_accum, t.max_length, t.calibrate_blend, t.calibrate_min_steps) == \
            (small["batch_size"], small["grad_accum"], small["max_length"], 0.85, 32)
        assert (t.anchor.learning_rate, t.anchor.epochs, t.generalize.epochs) == (4e-4, 2.0, 0.0)
        assert (t.mix.replay_answers, t.mix.anchor_general_ratio, t.mix.min_general_samples) == ("base", 3.0, 48)
        assert t.warmup_ratio == TrainingConfig().warmup_ratio  # not in the profile: the default
        seeds = cfg.training_for(cfg.profile_name(on_gpu=True))
        assert seeds.model_dump() == TrainingConfig(profile="seeds-7b").model_dump()


def test_a_profile_overrides_training_keys_and_names_its_mistakes(tmp_path):
    cfg = config_from_dict({"profiles": {"mine": {"anchor": {"epochs": 1.5}, "batch_size": 4}},
                            "training": {"profile": "mine", "anchor": {"learning_rate": 1e-3}}})
    t = cfg.training_for(cfg.profile_name(on_gpu=False))
    assert (t.anchor.epochs, t.anchor.learning_rate, t.batch_size) == (1.5, 1e-3, 4)
    assert cfg.profile_name(on_gpu=True) == "mine"  # named: the device does not matter
    auto = config_from_dict({})
    assert auto.profile_name(on_gpu=False) == "cpu-small" and auto.profile_name(on_gpu=True) == "seeds-7b"
    assert auto.training_for("seeds-7b").anchor.learning_rate == 2e-4  # the seeds' 7B recipe
    with pytest.raises(ConfigError, match=r"profiles.mine.anchor.learning_rat: unknown key \(did you mean"):
        config_from_dict({"profiles": {"mine": {"anchor": {"learning_rat": 1}}}})
    with pytest.raises(ConfigError, match="training.profile: unknown profile 'cpu-smal' \\(did you mean 'cpu-small'"):
        config_from_dict({"training": {"profile": "cpu-smal"}})
    with pytest.raises(ConfigError, match="profiles.mine.batch_size: must be greater than 0"):
        config_from_dict({"profiles": {"mine": {"batch_size": 0}}})


@pytest.mark.parametrize("key", ["min_identity_accuracy", "min_corrections_learned", "min_general_retention"])
@pytest.mark.parametrize("value", [0, -0.06, 1.5, float("nan")])
def test_a_gate_threshold_that_cannot_fail_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"eval.{key}: must be (above 0 and at most 1|a finite number)"):
        config_from_dict({"eval": {key: value}})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model:\n  bse: x\n", "model.bse: unknown key (did you mean 'base'?)"),
        ("worker:\n  port: eighty\n", "worker.port: must be an integer, got 'eighty'"),
        ("worker:\n  port: 70000\n", "worker.port: must be between 1 and 65535"),
        ("identity:\n  name: null\n", "identity.name: a value is required"),
        ("training:\n  gpu_policy: sometimes\n", "training.gpu_policy: must be one of 'concurrent' | 'pause'"),
        ("discord:\n  channels: 123\n", "discord.channels: must be a list of integers, got 123"),
        ("training:\n  lora:\n    r: 0\n", "training.lora.r: must be greater than 0"),
        ("model: [1, 2]\n", "model: must be a mapping"),
        ("model:\n  url: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, expected):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert expected in message
    assert str(path) in message and "\n" not in message


def test_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "config.yaml"
    path.write_text("store:\n  path: db/loopcord.db\nidentity:\n  name: Ada\n  author: Bob\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.path(cfg.store.path) == tmp_path / "sub" / "db" / "loopcord.db"
    assert "Ada" in cfg.identity.system and "Bob" in cfg.identity.system
    assert cfg.source == path.resolve()


@pytest.mark.parametrize("module", ["model", "trainer", "bot"])
def test_cli_start_up_stops_with_one_line_on_bad_config(tmp_path, module):
    path = tmp_path / "config.yaml"
    path.write_text("worker:\n  max_batch_size: -1\n", encoding="utf-8")
    args = {"model": ["serve"], "trainer": ["list"], "bot": []}[module]
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--config", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and "worker.max_batch_size: must be greater than 0" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_worker_serves_a_directory_as_given_and_converts_a_gguf_into_the_cache(tmp_path):
    """`model serve --model X`: a model directory is served as it is; a .gguf file is converted
    into model.cache_dir once (a converted copy is reused); a missing file is one clear line."""
    from model.loading import LoadError, converted_dir_for, serving_base

    cfg = config_from_dict({"model": {"cache_dir": str(tmp_path / "cache")}}, root=tmp_path)
    assert serving_base(cfg, str(tmp_path / "some-model-dir")) == tmp_path / "some-model-dir"
    with pytest.raises(LoadError, match="no such GGUF file"):
        serving_base(cfg, str(tmp_path / "missing.gguf"))
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    done = converted_dir_for(gguf, tmp_path / "cache")
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    assert serving_base(cfg, str(gguf)) == done.resolve()  # reused, not converted again


def test_an_unquoted_on_or_off_means_what_the_admin_wrote(tmp_path):
    """YAML 1.1 reads `off` as false; an auto/on/off setting takes it as "off"."""
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  cpu_data_parallel: off\n  cpu_bf16: on\neval:\n  cpu_parallel: off\n",
                    encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.training.cpu_data_parallel, cfg.training.cpu_bf16, cfg.eval.cpu_parallel) == ("off", "on", "off")


def _bot_config(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bot", "config", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def test_bot_config_prints_the_effective_values_with_the_profile_applied(tmp_path):
    """`python -m bot config`: every key as a run uses it; training.* is the profile under the
    keys the file writes (the file's batch size wins, the profile's grad_accum fills in)."""
    path = tmp_path / "config.yaml"
    path.write_text("identity:\n  name: Ada\ntraining:\n  profile: cpu-small\n  batch_size: 3\n"
                    "  calibrate:\n    learning_rate: 0.01\n", encoding="utf-8")
    proc = _bot_config("--config", str(path), env={"DISCORD_TOKEN": "sekrit-token-value"})
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    t = shown["training"]
    assert shown["identity"]["name"] == "Ada" and t["profile"] == "cpu-small"
    assert (t["batch_size"], t["calibrate"]["learning_rate"]) == (3, 0.01)  # the file's keys win
    assert (t["grad_accum"], t["max_length"], t["calibrate"]["epochs"], t["calibrate_blend"]) == (1, 512, 2.0, 0.85)
    assert (t["warmup_ratio"], shown["model"]["max_tokens"]) == (0.05, 512)  # the defaults
    assert "sekrit" not in proc.stdout and shown["discord"]["token_env"] == "DISCORD_TOKEN"
    assert "cpu-small profile" in proc.stdout and str(path) in proc.stdout
    # What it prints is itself a config that loads to the same values.
    again = config_from_dict(shown)
    assert again.training_for("cpu-small") == load_config(path).training_for("cpu-small")
    # auto on a machine without a GPU: cpu-small too.
    auto = tmp_path / "auto.yaml"
    auto.write_text("training:\n  grad_accum: 4\n", encoding="utf-8")
    proc = _bot_config("--config", str(auto), env={"CUDA_VISIBLE_DEVICES": ""})
    t = yaml.safe_load(proc.stdout)["training"]
    assert (t["profile"], t["grad_accum"], t["batch_size"]) == ("cpu-small", 4, 8), proc.stdout[:300]
    assert "training.profile auto, no GPU" in proc.stdout
    # --reference prints docs/CONFIGURATION.md.
    proc = _bot_config("--reference")
    assert proc.returncode == 0 and proc.stdout == (ROOT / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("text, expected", [
    ("model:\n  temperature: -0.5\n", "model.temperature: must be 0 or more, got -0.5"),
    ("memory:\n  min_similarity: 1.5\n", "memory.min_similarity: must be between -1 and 1, got 1.5"),
    ("training:\n  lora:\n    dropout: 1\n", "training.lora.dropout: must be at least 0 and below 1, got 1"),
    ("model:\n  top_p: .nan\n", "model.top_p: must be a finite number, got nan"),
    ("training:\n  anchor:\n    learning_rate: .inf\n",
     "training.anchor.learning_rate: must be a finite number, got inf"),
    ("model:\n  max_tokens: lots\n", "model.max_tokens: must be an integer, got 'lots'"),
    ("model:\n  max_tokens: 12.5\n", "model.max_tokens: must be an integer, got 12.5"),
    ("discord:\n  respond_in_dms: maybe\n", "discord.respond_in_dms: must be true or false, got 'maybe'"),
    ("worker:\n  dtype: fp8\n", "worker.dtype: must be one of 'auto' | 'bfloat16' | 'float16' | 'float32', got 'fp8'"),
    ("training:\n  mix:\n    rewordigns: 4\n", "training.mix.rewordigns: unknown key (did you mean 'rewordings'?)"),
    ("memroy:\n  enabled: false\n", "memroy: unknown key (did you mean 'memory'?)"),
])
def test_a_bad_value_is_one_clear_line_naming_the_key(tmp_path, text, expected):
    """Out of range, NaN, the wrong type, a misspelt key: `python -m bot config` (and every
    start-up) stops with the file, the key and what is wrong, on one line."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {expected}"
    if "unknown key" in expected or "nan" in expected:  # as a user sees it, from a child process
        proc = _bot_config("--config", str(path))
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.splitlines() == [f"error: {path}: {expected}"]


def test_several_problems_name_the_first_and_count_the_rest():
    with pytest.raises(ConfigError, match=r"^model.max_tokens: must be greater than 0, got 0 \(and 1 more problem\)$"):
        config_from_dict({"model": {"max_tokens": 0}, "worker": {"max_queue": 0}})


def test_an_empty_section_means_its_defaults_and_a_set_value_is_checked_too():
    cfg = config_from_dict({"training": {"lora": None}, "model": None})
    assert cfg.training.lora.r == 8 and cfg.model.max_tokens == 512
    assert cfg.training_for("cpu-small").lora.dropout == 0.0  # `lora:` left empty keeps the profile's
    with pytest.raises(ValidationError):
        cfg.worker.port = 70000
    with pytest.raises(ValidationError):
        cfg.model.temperature = math.nan
    cfg.worker.port = 9123
    assert cfg.worker.port == 9123
