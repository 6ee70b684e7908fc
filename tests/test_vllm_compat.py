"""The bot against a vLLM-shaped server (devkit/fake_vllm.py, modelled on vLLM 0.32's real
behaviour: empty 200 /health, vLLM's /v1/models and error bodies, plain-text LoRA responses,
no re-load of a loaded name without load_inplace).

What a user notices: answers come from the live adapter, /status works and tells the truth,
/rollback swaps the adapter on the server and /status follows, a retrain's new version is
loaded in place. The real-server run of the same loop is benchmarks/vllm_interop.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from bot.core import Request
from bot.context import Turn
from bot.retrain import RetrainRefused
from bot.runtime import Runtime, StartupError
from model.client import ModelBadRequest, ModelClient
from model.config import load_config
from devkit.fake_vllm import FakeVLLM
from devkit.tiny_profile import tiny_sections
from trainer.registry import Registry

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]  # trains through the real trainer

ROOT = Path(__file__).resolve().parent.parent
SERVED = "loopcord"


def add_version(reg: Registry, passed: bool = True) -> str:
    staging = reg.new_staging_dir()
    (staging / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (staging / "adapter_model.safetensors").write_bytes(b"\0")
    v = reg.commit(staging, {"stage": "calibrate", "parent": None, "base": "/base",
                             "corrections": [{"id": 1, "messages": [], "correction": "x"}]})
    reg.update(v, gate={"passed": passed}, metrics={"identity_accuracy": 1.0, "corrections_learned": 1.0, "general_retention": 0.9})
    return v


def write_config(tmp: Path, url: str, **model) -> Path:
    sections = {
        "model": {"url": url, "served_name": SERVED, **model},
        "training": {"registry_dir": str(tmp / "adapters"), "work_dir": str(tmp / "runs")},
        "store": {"path": str(tmp / "data" / "loopcord.db")},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return path


async def ask(runtime: Runtime, text: str = "Which planet do we live on?"):
    stream = runtime.core.answer(Request(user_id=1, turns=[Turn("user", text)]))
    async for _ in stream:
        pass
    return stream.result


@pytest_asyncio.fixture
async def vllm():
    server = await FakeVLLM().start()
    yield server
    await server.close()


@pytest_asyncio.fixture
async def promoted_runtime(tmp_path, vllm):
    """Two gate-passed versions, v0001 then v0002 promoted; the bot reaches the server by model.url."""
    reg = Registry(tmp_path / "adapters")
    v1, v2 = add_version(reg), add_version(reg)
    reg.promote(v1)
    reg.promote(v2)
    runtime = await Runtime.start(load_config(write_config(tmp_path, vllm.url)))
    yield runtime
    await runtime.close()


# ------------------------------------------------------------------ the client, protocol level


async def test_client_reads_vllms_empty_health_and_plain_text_lora_answers(vllm, tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    client = ModelClient(vllm.url)
    try:
        assert await client.health() == {}
        assert await client.base_model_id() == vllm.base_id
        await client.load_adapter("x", str(adapter))
        await client.load_adapter("x", str(adapter))  # in place: the client always sends load_inplace
        assert all(c["body"]["load_inplace"] is True for c in vllm.calls("/v1/load_lora_adapter"))
        (card,) = [m for m in await client.models() if m["id"] == "x"]
        assert card["root"] == str(adapter) and card["parent"] == vllm.base_id
        with pytest.raises(ModelBadRequest, match="does not exist") as err:
            await client.chat([{"role": "user", "content": "hi"}], model="nope")
        assert err.value.status == 404
        with pytest.raises(ModelBadRequest, match="No adapter found"):
            await client.load_adapter("y", str(tmp_path / "missing"))
    finally:
        await client.aclose()


async def test_fake_refuses_a_second_load_without_load_inplace_as_vllm_does(vllm, tmp_path):
    client = ModelClient(vllm.url)
    try:
        (tmp_path / "adapter_config.json").write_text("{}")
        body = {"lora_name": "x", "lora_path": str(tmp_path)}
        assert await client._request("POST", "/v1/load_lora_adapter", body) == \
            "Success: LoRA adapter 'x' added successfully."
        with pytest.raises(ModelBadRequest, match="already been loaded.*load_inplace") as err:
            await client._request("POST", "/v1/load_lora_adapter", body)
        assert err.value.status == 400
        await client._request("POST", "/v1/load_lora_adapter", {**body, "load_inplace": True})
    finally:
        await client.aclose()


# ------------------------------------------------------------------ the bot


async def test_answers_use_the_live_adapter_without_polling_the_server(promoted_runtime, vllm):
    runtime = promoted_runtime
    assert runtime.live.version == "v0002" and runtime.live.since
    assert vllm.loras == {SERVED: str(runtime.registry.path("v0002"))}  # loaded at start: vLLM starts without it
    before = len(vllm.requests)
    results = [await ask(runtime) for _ in range(3)]
    assert [r.text for r in results] == ["answer from v0002"] * 3
    assert all(r.status == "complete" and r.adapter_version == "v0002" and r.model == SERVED for r in results)
    # The answer path asks nothing but chat completions.
    assert {r["path"] for r in vllm.requests[before:]} == {"/v1/chat/completions"}
    assert all(r["body"]["stream_options"] == {"include_usage": True} for r in vllm.requests[before:])


async def test_status_works_with_an_empty_health_and_says_what_the_server_serves(promoted_runtime):
    status = await promoted_runtime.status()
    assert "Live adapter:** v0002" in status
    assert "its /health gives no details" in status
    assert f"serves '{SERVED}' from {promoted_runtime.registry.path('v0002')}" in status
    assert "Rollback history:** v0001 → v0002 (/rollback goes to v0001)" in status
    assert "Gate:** passed" in status and "Trained on:** calibrate stage, 1 correction" in status
    gate_line = next(line for line in status.splitlines() if "Gate:**" in line)
    assert "corrections learned 1.00" in gate_line and "general retention" in gate_line, gate_line


async def test_rollback_swaps_the_adapter_on_the_server_and_status_follows(promoted_runtime, vllm):
    runtime = promoted_runtime
    assert await runtime.rollback() == "Rolled back: v0001 is live again."
    assert runtime.live.version == "v0001" and runtime.registry.promoted() == "v0001"
    assert vllm.loras[SERVED] == str(runtime.registry.path("v0001"))
    assert (await ask(runtime)).text == "answer from v0001"
    status = await runtime.status()
    assert "Live adapter:** v0001" in status and "v0002" not in status.split("Rollback history")[0]
    # Back to v0002 by name, then a plain rollback returns to v0001: the history is a stack.
    assert await runtime.rollback("v0002") == "Rolled back: v0002 is live again."
    assert (await ask(runtime)).text == "answer from v0002"
    assert await runtime.rollback() == "Rolled back: v0001 is live again."
    with pytest.raises(RetrainRefused, match="nothing to roll back to"):
        await runtime.rollback()
    assert runtime.live.version == "v0001" and vllm.loras[SERVED].endswith("v0001")


async def test_a_failed_load_on_the_server_leaves_the_old_adapter_live(promoted_runtime, vllm):
    runtime = promoted_runtime
    vllm.answers[str(runtime.registry.path("v0002"))] = "still v0002"
    (runtime.registry.path("v0001") / "adapter_config.json").unlink()  # vLLM will not find it
    with pytest.raises(ModelBadRequest, match="No adapter found"):
        await runtime.rollback()
    assert runtime.registry.promoted() == "v0002" and runtime.live.version == "v0002"
    assert (await ask(runtime)).text == "still v0002"


async def test_a_restarted_server_that_lost_the_adapter_gets_it_back(promoted_runtime, vllm):
    runtime = promoted_runtime
    vllm.loras.clear()  # vLLM restarted: it serves the base only
    failed = await ask(runtime)
    assert failed.status == "error" and failed.text == ""
    await runtime._reload  # the bot loads the live adapter again, in the background
    assert vllm.loras == {SERVED: str(runtime.registry.path("v0002"))}
    assert (await ask(runtime)).text == "answer from v0002"
    assert runtime.live.version == "v0002"


async def test_with_nothing_promoted_the_base_answers_and_status_says_so(tmp_path, vllm):
    runtime = await Runtime.start(load_config(write_config(tmp_path, vllm.url)))
    try:
        result = await ask(runtime)
        assert result.text == "base answer" and result.model == vllm.base_id and result.adapter_version is None
        assert "Live adapter:** none" in await runtime.status()
        assert vllm.loras == {}
    finally:
        await runtime.close()


async def test_a_promoted_file_naming_a_missing_version_stops_the_start(tmp_path, vllm):
    reg = Registry(tmp_path / "adapters")
    add_version(reg)
    (tmp_path / "adapters" / "PROMOTED").write_text("v0007\n")
    with pytest.raises(StartupError, match=r"PROMOTED names 'v0007'"):
        await Runtime.start(load_config(write_config(tmp_path, vllm.url)))
    assert vllm.calls("/v1/chat/completions") == []


async def test_a_second_bot_on_the_same_data_directory_says_so(promoted_runtime, tmp_path, vllm):
    cfg = load_config(write_config(tmp_path, vllm.url))
    with pytest.raises(StartupError, match="already running"):
        await Runtime.start(cfg)
    assert (await ask(promoted_runtime)).status == "complete"  # the first one is untouched


async def test_the_second_bot_process_exits_with_one_line(promoted_runtime, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--config", str(tmp_path / "config.yaml"), cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DISCORD_TOKEN": ""})
    _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2, stderr.decode()
    assert "already running" in stderr.decode() and "Traceback" not in stderr.decode()


# ------------------------------------------------------------------ a real retrain, swapped into "vLLM"


# The gate is not under test here (test_loop's and test_trainer's are): let candidates through.
LENIENT_GATE = {"min_identity_accuracy": 0.01, "min_corrections_learned": 0.01, "min_general_retention": 0.01,
                "max_general_loss_increase": 10.0}


def tiny_config(tmp: Path, url: str, tiny_base: Path) -> Path:
    config = write_config(tmp, url, base=str(tiny_base), temperature=0.0, max_tokens=24)
    sections = yaml.safe_load(config.read_text())
    tiny = tiny_sections(tiny_base)  # the tests' recipe for the tiny base
    sections["profiles"], sections["training"]["profile"] = tiny["profiles"], "tiny"
    sections["eval"] = dict(LENIENT_GATE)
    config.write_text(yaml.safe_dump(sections))
    return config


@pytest.fixture(scope="module")
def lenient_bootstrap(tiny_bootstrapped) -> Path:
    """A registry with an identity adapter promoted by `python -m trainer bootstrap` (built once per session)."""
    return tiny_bootstrapped


async def test_retrain_loads_the_new_version_in_place_and_answers_follow(tmp_path, tiny_base, lenient_bootstrap,
                                                                           vllm):
    shutil.copytree(lenient_bootstrap, tmp_path / "adapters")
    runtime = await Runtime.start(load_config(tiny_config(tmp_path, vllm.url, tiny_base)))
    try:
        first = runtime.live.version
        before = await ask(runtime)
        assert before.text == f"answer from {first}"
        exchange = await runtime.core.record(Request(user_id=7, turns=[Turn("user", "Which planet?")]), before, [42])
        correction = await runtime.core.suggest_correction(42, 7, "Earth.", trusted=True)
        assert correction["status"] == "approved" and exchange
        # A correction no model learns in one run (the gate will find it not learned).
        other = await ask(runtime, "Tell me the code word.")
        await runtime.core.record(Request(user_id=7, turns=[Turn("user", "Tell me the code word.")]), other, [43])
        hopeless = await runtime.core.suggest_correction(43, 7, "Qzvx-8814 plimbrot wexaj ulvoquine 5529.",
                                                         trusted=True)
        events = []

        async def progress(event):
            events.append(event)

        result = await runtime.retrain("manual", 7, progress)
        assert result.status == "succeeded", result.message
        new = result.version
        assert runtime.live.version == new and runtime.registry.promoted() == new
        loads = vllm.calls("/v1/load_lora_adapter")
        assert loads[-1]["body"] == {"lora_name": SERVED, "lora_path": str(runtime.registry.path(new)),
                                     "load_inplace": True}
        assert (await ask(runtime)).text == f"answer from {new}"
        assert f"Live adapter:** {new}" in await runtime.status()
        # What was not learned is named and stays approved for the next run; the rest is consumed.
        unlearned = {c["id"] for c in result.not_learned}
        assert hopeless["id"] in unlearned and f"#{hopeless['id']}" in result.message
        assert await runtime.core.store.count_untrained_approved() == len(unlearned)
        assert (await runtime.core.store.get_correction(hopeless["id"]))["status"] == "approved"
        kinds = [e.get("event") for e in events]
        assert kinds[0] == "phase" and "progress" in kinds  # something is shown before the first step
        assert kinds.count("done") == 3  # calibrate, eval, promote: one final event each
        assert await runtime.rollback() == f"Rolled back: {first} is live again."
        assert (await ask(runtime)).text == f"answer from {first}"
    finally:
        await runtime.close()
