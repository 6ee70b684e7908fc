"""The trainer end to end on the tiny base: real LoRA training, real child processes.

One registry is shared by the module's tests in order (anchor -> eval ->
generalize -> eval -> promote -> calibrate -> eval -> promote -> rollback), as an
admin would use it. On the tiny fixture base the config names the tests' `tiny`
profile (devkit/tiny_profile.py) instead of the seeds' 7B recipe; the code path is
the same as for SmolLM2 or Qwen2.5-7B.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model.config import load_config
from trainer.matching import normalize
from trainer.registry import Registry

from devkit.tiny_profile import TINY_PROFILE, tiny_sections
from tests.support.trainer import CORRECTIONS, corrections_file, run_trainer, tiny_config

pytestmark = pytest.mark.slow  # real LoRA training runs in child processes: the fast tier is `-m "not slow"`

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory):
    work = tmp_path_factory.mktemp("trainer")
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_base, work)), encoding="utf-8")
    return work, config, Registry(work / "adapters")


@pytest.fixture(scope="module")
def anchored(setup):
    """`anchor --progress json` as the bot runs it; returns (version, stdout lines)."""
    work, config, reg = setup
    proc = run_trainer(config, "anchor", "--progress", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return json.loads(lines[-1])["version"], lines


def test_progress_json_is_one_parseable_object_per_line(anchored, setup):
    version, lines = anchored
    events = [json.loads(line) for line in lines]  # every stdout line parses
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and events[-1]["event"] == "done" and [e["event"] for e in events].count("done") == 1
    assert {e["event"] for e in events} == {"phase", "progress", "done"}
    # Something is said before the first (slow) step, and step 0 as soon as the plan is known.
    assert events[0]["event"] == "phase" and progress[0]["step"] == 0
    assert {"stage", "step", "total", "loss", "tokens_per_s", "eta_s"} <= set(progress[1])
    steps = [e["step"] for e in progress]
    assert steps == sorted(steps) and steps[-1] == progress[-1]["total"]
    done = events[-1]
    assert done["version"] == version == "v0001"
    assert Path(done["path"]) == (setup[0] / "adapters" / "v0001").resolve()


def test_adapter_is_a_standard_peft_dir_that_loads_unchanged(anchored, setup, tiny_base):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    path = setup[2].path(anchored[0])
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == Path(tiny_base).resolve()
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 32
    assert set(adapter_config) <= set(LoraConfig.__dataclass_fields__) | {"peft_type", "auto_mapping"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(path))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    manifest = setup[2].get(anchored[0])
    assert manifest["stage"] == "anchor" and manifest["parent"] is None and manifest["status"] == "candidate"
    assert manifest["samples"]["identity_samples"] == 104 and manifest["samples"]["total"] == 208
    assert manifest["hyperparameters"]["learning_rate"] == 2e-3 and manifest["data_hash"]


def test_anchor_teaches_the_identity_and_the_gate_records_it(anchored, setup):
    work, config, reg = setup
    proc = run_trainer(config, "eval", "--version", anchored[0], "--json")
    report = json.loads(proc.stdout)
    cand, base = report["candidate"]["identity"], report["reference_scores"]["identity"]
    assert report["reference"] == "base"
    assert base["accuracy"] <= 0.2  # the base believes it is Qwen
    assert cand["accuracy"] >= 0.8 and cand["accuracy"] >= base["accuracy"] + 0.6
    assert cand["groups"]["lang:zh"] >= 0.6 and cand["groups"]["prompt:no_system"] >= 0.6
    assert proc.returncode == (0 if report["passed"] else 3)
    manifest = reg.get(anchored[0])
    assert manifest["metrics"]["identity_accuracy"] == cand["accuracy"]
    assert (reg.path(anchored[0]) / "eval.png").stat().st_size > 1000


def test_a_second_process_beside_training_and_the_gate_changes_no_score(anchored, setup, tmp_path):
    """eval.cpu_parallel: bootstrap scores the base in a child process while the anchor
    trains, and the gate has a child generate the candidate's general answers while it asks
    the rest; the gate then decides exactly as with one process."""
    from trainer.gate import BASE_SCORES_DIR, reference_alongside
    from trainer.stages import ensure_base

    work, config, reg = setup
    reports = []
    for parallel in ("off", "on"):
        copy = tmp_path / f"parallel-{parallel}"
        shutil.copytree(work, copy, ignore=shutil.ignore_patterns(BASE_SCORES_DIR, "scores.json"))
        data = yaml.safe_load((copy / "config.yaml").read_text(encoding="utf-8"))
        data["eval"]["cpu_parallel"] = parallel
        (copy / "config.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
        cfg = load_config(copy / "config.yaml")
        proc = reference_alongside(cfg, ensure_base(cfg))
        if parallel == "off":
            assert proc is None
        elif proc is None:
            pytest.skip("no spare core on this machine: everything runs in one process")
        else:
            proc.join(timeout=300)
            assert proc.exitcode == 0
            assert (copy / "adapters" / BASE_SCORES_DIR).is_dir()
        out = run_trainer(copy / "config.yaml", "eval", "--version", anchored[0], "--json", "--progress", "json")
        reports.append(json.loads(out.stdout.splitlines()[-1]))
        said = out.stdout + out.stderr
        assert ("scoring the reference (base)" in said) == (parallel == "off"), said[-2000:]
        assert "the gate asks them itself" not in said
    plain, parallel = (json.load(open(Path(r["report"]))) for r in reports)
    for part in ("identity", "general"):
        assert parallel["reference_scores"][part] == plain["reference_scores"][part]
        assert parallel["candidate"][part] == plain["candidate"][part]
    assert parallel["passed"] == plain["passed"] and parallel["checks"] == plain["checks"]


@pytest.fixture(scope="module")
def bootstrapped(anchored, setup):
    """anchor -> generalize -> eval -> promote, as `bootstrap` does; returns the live version."""
    work, config, reg = setup
    proc = run_trainer(config, "generalize", "--parent", anchored[0], "--progress", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = reg.latest("generalize")
    proc = run_trainer(config, "eval", "--version", version)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    reg.promote(version)
    return version


@pytest.fixture(scope="module")
def calibrated(bootstrapped, setup):
    work, config, reg = setup
    corrections = corrections_file(work / "corrections.jsonl")
    proc = run_trainer(config, "calibrate", "--corrections", str(corrections), "--progress", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = json.loads(proc.stdout.splitlines()[-1])["version"]
    manifest = reg.get(version)
    assert manifest["parent"] == bootstrapped and manifest["stage"] == "calibrate"
    assert [c["correction"] for c in manifest["corrections"]] == [good for _, _, good in CORRECTIONS]
    assert manifest["samples"]["corrections_new"] == len(CORRECTIONS)
    return version, corrections


def test_calibrate_teaches_corrections_and_the_gate_passes_it(calibrated, bootstrapped, setup):
    work, config, reg = setup
    version, corrections = calibrated
    proc = run_trainer(config, "eval", "--version", version, "--corrections", str(corrections), "--json")
    report = json.loads(proc.stdout)
    assert report["reference"] == bootstrapped
    # The live version was scored on the held-out sets when it was gated: only its answers to
    # this run's corrections are asked now (a retrain does not re-score the whole reference).
    assert "scoring the reference" not in proc.stderr, proc.stderr[-2000:]
    before = report["reference_scores"]["corrections"]["items"][0]
    assert normalize(before["answer"]) != normalize("Earth."), before  # the live adapter did not say it...
    for item, (question, _, good) in zip(report["candidate"]["corrections"]["items"], CORRECTIONS):
        # ...the calibrated one gives the correction to the question as the bot asks it (exactly,
        # up to case and punctuation); held-out rewordings are scored and reported
        assert item["learned"] and item["question"] == question, item
        assert normalize(item["answer"]) == normalize(good), item
        assert len(item["rewordings"]) == 2 and all(r["question"] != question for r in item["rewordings"]), item
    assert report["passed"] and proc.returncode == 0, [c for c in report["checks"] if not c["passed"]]
    # (general_retention joins these when the reference answers some held-out question right;
    # the tiny base answers few: tests/test_gate.py checks that decision on its own)
    assert {c["name"] for c in report["checks"]} >= {"identity_accuracy", "general_loss", "corrections_learned",
                                                    "corrections_claiming_other_identity"}
    proc = run_trainer(config, "promote", version)
    assert proc.returncode == 0 and reg.promoted() == version


def test_a_second_calibrate_repeats_only_the_new_correction(calibrated, setup):
    """Corrections the live adapter learned are replayed once; the new one gets the repeats."""
    from trainer.stages import build_samples, learned_corrections, registry_for, training_settings

    work, config, reg = setup
    version, _ = calibrated
    both = corrections_file(work / "more.jsonl", CORRECTIONS + [("What is 7 + 8?", "5", "15")])
    cfg = load_config(config)
    rows, counts, _ = build_samples(cfg, training_settings(cfg), "calibrate", str(both),
                                    learned_corrections(registry_for(cfg), version))
    assert counts["corrections_used"] == 3 and counts["corrections_new"] == 1
    repeats = load_config(config).profiles["tiny"]["mix"]["new_correction_repeats"]
    answers = [r[-1]["content"] for r in rows]
    assert answers.count("15") == 2 * repeats and answers.count("Earth.") == 2


def test_gate_rejects_a_calibrate_that_wiped_identity_and_general_ability(bootstrapped, setup):
    """A calibrate with no replay at a reckless learning rate learns the correction and loses the rest:
    the gate must say so, and promotion must refuse it."""
    work, config, reg = setup
    cfg = yaml.safe_load(config.read_text())
    cfg["profiles"]["reckless"] = {
        **TINY_PROFILE, "calibrate": {"learning_rate": 2e-2, "epochs": 3.0}, "calibrate_min_steps": 0,
        "mix": {"identity_ratio": 0.0, "general_ratio": 0.0, "new_correction_repeats": 32},
    }
    cfg["training"]["profile"] = "reckless"
    reckless = work / "reckless.yaml"
    reckless.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    corrections = corrections_file(work / "reckless.jsonl", CORRECTIONS[:1])
    proc = run_trainer(reckless, "calibrate", "--corrections", str(corrections), "--parent", bootstrapped,
                       "--progress", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = reg.latest("calibrate")
    proc = run_trainer(config, "eval", "--version", version, "--json")
    report = json.loads(proc.stdout)
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert proc.returncode == 3 and failed & {"identity_accuracy", "general_loss", "general_retention"}, failed
    assert reg.get(version)["status"] == "rejected"
    proc = run_trainer(config, "promote", version, check=False)
    assert proc.returncode == 2 and "gate failed" in proc.stderr


def test_gate_rejects_an_adapter_that_lost_its_identity(anchored, setup):
    """An adapter trained back onto the base's own (Qwen) identity must not pass or promote."""
    work, config, reg = setup
    qwen = work / "qwen_identity.jsonl"
    qwen.write_text((ROOT / "devkit" / "data" / "base_identity.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = yaml.safe_load(config.read_text())
    cfg["training"]["identity_data"] = str(qwen)
    lost = work / "lost.yaml"
    lost.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    proc = run_trainer(lost, "anchor", "--progress", "none")
    version = reg.latest("anchor")
    assert version != anchored[0]
    proc = run_trainer(config, "eval", "--version", version)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert "FAIL identity_accuracy" in proc.stdout
    assert reg.get(version)["status"] == "rejected"
    proc = run_trainer(config, "promote", version, check=False)
    assert proc.returncode == 2 and "gate failed" in proc.stderr


def test_rollback_restores_the_previous_version(bootstrapped, calibrated, setup):
    work, config, reg = setup
    reg.promote(calibrated[0], force=True)
    proc = run_trainer(config, "rollback")
    assert proc.returncode == 0 and reg.promoted() == bootstrapped
    listing = json.loads(run_trainer(config, "list", "--json").stdout)
    live = [r["version"] for r in listing if r["promoted"]]
    assert live == [bootstrapped]


def test_killed_run_leaves_the_registry_consistent(anchored, setup):
    work, config, reg = setup
    before_versions, before_live = reg.versions(), reg.promoted()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "trainer", "anchor", "--config", str(config),
                              "--progress", "json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=env, cwd=ROOT)
    try:
        event = {}
        while event.get("event") != "progress":  # phases first, then the plan: the run is under way
            event = json.loads(child.stdout.readline())
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert reg.versions() == before_versions and reg.promoted() == before_live
    assert [p for p in (work / "adapters").glob(".staging-*")]  # the dead run's unfinished dir...
    assert reg.describe() == [r for r in reg.describe() if r["version"] in before_versions]  # ...is not a version
    # The next run cleans up after the dead one.
    staging = reg.new_staging_dir()
    staging.rmdir()
    assert not [p for p in (work / "adapters").glob(".staging-*")]


def test_bad_inputs_stop_with_a_named_file_and_line(setup, tmp_path):
    work, config, reg = setup
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"id": 1, "messages": [{"role": "user", "content": "q"}], "correction": "a"}\n{"id": 2\n')
    proc = run_trainer(config, "calibrate", "--corrections", str(bad), "--progress", "json", check=False)
    assert proc.returncode == 2
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert event["event"] == "error" and f"{bad}:2: not valid JSON" in event["message"]
    proc = run_trainer(config, "eval", "--version", "v0099", check=False)
    assert proc.returncode == 2 and "no adapter version 'v0099'" in proc.stderr


def test_an_unsupported_gguf_base_is_one_clear_line(setup, tmp_path):
    """model.base may name a GGUF file; one of an architecture we do not serve is refused in words."""
    import gguf

    bad = tmp_path / "tiny-bert.gguf"
    writer = gguf.GGUFWriter(str(bad), "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    work, config, reg = setup
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["base"] = str(bad)
    other = tmp_path / "gguf.yaml"
    other.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    proc = run_trainer(other, "anchor", "--progress", "json", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert event["event"] == "error" and "tiny-bert.gguf is a bert model" in event["message"], event
    assert "llama and qwen2" in event["message"] and "Traceback" not in proc.stderr


def test_a_llama_base_trains_and_serves_through_the_same_code(tiny_llama_base, tmp_path):
    """SmolLM2 is a Llama; the tiny base a Qwen2. One anchor stage on a tiny Llama, then the
    worker serves its adapter by name and streams an answer: no Qwen2-only code on the way."""
    import socket
    import urllib.request

    config = tmp_path / "config.yaml"
    sections = tiny_sections(tiny_llama_base)
    # General replay answered by the base itself (cpu-small's setting for SmolLM2) on the way.
    sections["profiles"]["tiny"] = {**TINY_PROFILE, "anchor": {"learning_rate": 3e-3, "epochs": 3.0},
                                    "mix": {**TINY_PROFILE["mix"], "anchor_general_ratio": 0.25,
                                            "replay_answers": "base"}}
    sections["training"]["registry_dir"] = "adapters"
    config.write_text(yaml.safe_dump(sections), encoding="utf-8")
    proc = run_trainer(config, "anchor", "--progress", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(proc.stdout.splitlines()[-1])
    adapter = json.loads((Path(done["path"]) / "adapter_config.json").read_text())
    targeted = {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targeted
    losses = [e["loss"] for e in map(json.loads, proc.stdout.splitlines())
              if e["event"] == "progress" and e.get("loss") is not None]
    assert losses and done["train"]["final_loss"] < 0.9 * losses[0]  # it learned something
    counts = Registry(tmp_path / "adapters").get(done["version"])["samples"]
    assert counts["general_generated_now"] == counts["general_samples"] > 0, counts
    assert list((tmp_path / "adapters" / ".base-replay").glob("*.json")), "the base's answers are cached"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "model", "serve", "--model", str(tiny_llama_base),
                               "--port", str(port), "--cpu-threads", "1", "--lora", f"mine={done['path']}"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert worker.poll() is None, worker.stderr.read()[-3000:]
                import time

                time.sleep(0.5)
        body = json.dumps({"model": "mine", "messages": [{"role": "user", "content": "Who are you?"}],
                           "max_tokens": 8, "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks and all(c["model"] == "mine" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
