"""The model worker end to end: a real `python -m model serve` child process, real HTTP.

One worker (tiny base + two LoRA adapters) serves most tests in this module;
the SIGTERM and tiny-queue tests start their own.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import aiohttp
import pytest

from model.client import ModelBadRequest, ModelClient, ModelOverloaded, ModelUnavailable
from model.process import WorkerProcess, free_port
from tests.support.adapters import make_adapter

pytestmark = pytest.mark.slow  # starts real worker processes: the fast tier is `-m "not slow"`

ASK = [{"role": "user", "content": "What is the capital of France?"}]
ZH_PROMPTS = ["法国的首都是哪里？", "你好", "写一首关于春天的诗", "中国的首都是哪里？"]
GREEDY = {"temperature": 0}
IGNORE_EOS = {"ignore_eos": True}  # vLLM's parameter: keeps a request running for max_tokens
ONE_THREAD = ["--cpu-threads", "1"]  # the test machine is small and shared
LONG = 1500  # tokens: long enough that a request is surely still running when we act on it
KEY = "test-worker-key"  # control routes (load/unload, sleep/wake) need the key
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(tiny_base, root / "a", seed=1)
    b = make_adapter(tiny_base, root / "b", seed=2)
    return {"a": str(a), "b": str(b), "root": root}


@pytest.fixture(scope="module")
def worker(tiny_base, adapter_dirs, tmp_path_factory):
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = WorkerProcess(["--model", str(tiny_base), "--served-model-name", "tiny", *ONE_THREAD,
                          "--lora", f"a={adapter_dirs['a']}", "--lora", f"b={adapter_dirs['b']}",
                          "--adapter-root", str(tmp_path_factory.getbasetemp()),
                          "--max-batch-size", "16"], log_path=log, api_key=KEY).start()
    yield proc
    proc.stop()


@pytest.fixture
async def client(worker):
    c = ModelClient(worker.url, api_key=KEY)
    yield c
    await c.aclose()


async def post(url: str, body, path="/v1/chat/completions", headers=None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, data=data, headers=headers or {"Content-Type": "application/json", **AUTH}) as r:
            text = await r.text()
            return r.status, (json.loads(text) if r.content_type == "application/json" else text), r.headers


async def sse_events(resp, on_event=None) -> list:
    """Read an SSE body into a list of decoded `data:` payloads ('[DONE]' kept as a string);
    `on_event(event)`, if given, sees each one as it arrives."""
    events, buf = [], b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            data = raw.decode("utf-8")  # strict: a split multi-byte character would raise here
            assert data.startswith("data: ")
            payload = data[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if on_event is not None:
                on_event(events[-1])
    return events


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[-1])
    raise AssertionError(f"metric {name} missing")


async def first_delta(agen):
    async for piece in agen:
        if piece:
            return piece


# ---------------- chat ----------------


async def test_stream_joins_to_the_non_streamed_answer(client):
    full = await client.chat(ASK, model="tiny", max_tokens=24, **GREEDY)
    pieces = [p async for p in client.stream_chat(ASK, model="tiny", max_tokens=24, **GREEDY)]
    assert full and "".join(pieces) == full
    assert len(pieces) >= 1


async def test_sse_stream_follows_the_openai_chunk_protocol(worker):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(worker.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] in ("stop", "length")
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    fingerprints = {c["system_fingerprint"] for c in chunks}  # OpenAI's: which weights answered, on every chunk
    assert len(fingerprints) == 1 and fingerprints.pop().startswith("fp_")


async def test_non_stream_reports_usage_and_length_finish(worker):
    status, body, _ = await post(worker.url, {"messages": ASK, "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3 and body["usage"]["prompt_tokens"] > 0
    assert body["system_fingerprint"].startswith("fp_")


async def test_chinese_answers_stream_as_whole_characters(worker, client):
    cjk_seen = False
    for prompt in ZH_PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        body = {"model": "tiny", "messages": msgs, "max_tokens": 32, "temperature": 0, "stream": True}
        async with aiohttp.ClientSession(headers=AUTH) as s:
            async with s.post(worker.url + "/v1/chat/completions", json=body) as r:
                events = await sse_events(r)
        deltas = [c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"]]
        assert all("\ufffd" not in d for d in deltas)
        joined = "".join(deltas)
        assert joined == await client.chat(msgs, model="tiny", max_tokens=32, **GREEDY)
        cjk_seen |= any("\u4e00" <= ch <= "\u9fff" for ch in joined)
    assert cjk_seen, "no answer contained Chinese; the check above proved nothing"


async def test_stop_string_cuts_the_answer_without_leaking_it(client):
    full = await client.chat(ASK, model="tiny", max_tokens=24, **GREEDY)
    assert len(full) >= 4
    stop = full[2:4]
    pieces = [p async for p in client.stream_chat(ASK, model="tiny", max_tokens=24, stop=[stop], **GREEDY)]
    assert "".join(pieces) == full[: full.index(stop)]


async def test_eight_concurrent_requests_are_batched(worker, client):
    before_count = await metric(worker.url, "loopcord_worker_batch_size_count")
    before_single = await metric(worker.url, 'loopcord_worker_batch_size_bucket{le="1.0"}')
    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(8)]
    answers = await asyncio.gather(*[
        client.chat(p, model="tiny", max_tokens=40, **GREEDY) for p in prompts])
    assert len(answers) == 8 and all(isinstance(a, str) for a in answers)
    steps = await metric(worker.url, "loopcord_worker_batch_size_count") - before_count
    single = await metric(worker.url, 'loopcord_worker_batch_size_bucket{le="1.0"}') - before_single
    assert steps > 0 and single < steps, "no decode step ran more than one sequence"


# ---------------- adapters ----------------


async def test_models_lists_base_then_adapters(client, adapter_dirs):
    models = await client.models()
    assert models[0]["id"] == "tiny" and models[0]["parent"] is None
    assert {m["id"]: (m["parent"], m["root"]) for m in models[1:]} == {
        "a": ("tiny", adapter_dirs["a"]), "b": ("tiny", adapter_dirs["b"])}
    assert await client.base_model_id() == "tiny"


async def test_two_adapters_give_different_answers(client):
    answers = {m: await client.chat(ASK, model=m, max_tokens=16, **GREEDY) for m in ("tiny", "a", "b")}
    assert answers["a"] != answers["b"]
    assert answers["a"] != answers["tiny"]


async def answer(worker, model: str, max_tokens: int = 48) -> tuple[str, str]:
    """(text, system_fingerprint) of one greedy non-streamed answer."""
    status, body, _ = await post(worker.url, {"model": model, "messages": ASK, "max_tokens": max_tokens, **GREEDY})
    assert status == 200, body
    return body["choices"][0]["message"]["content"], body["system_fingerprint"]


async def test_hot_swap_during_live_streams_fails_none(worker, client, adapter_dirs):
    """Eight streams on "a" while "a" is swapped to b's files: none fails, each goes on streaming
    after the swap, and each is answered by the version it was admitted on (the weights-level
    check, token for token, is the engine's: test_engine's hot-swap test, where batch shapes are
    fixed; here the rows share steps with each other, whose rounding a near-tie of the tiny
    model can follow, so no text here is compared across batch shapes or prefix-cache hits: the
    fingerprint names the weights, the text only has to differ from the other version's)."""
    old_a, fp_a = await answer(worker, "a")
    answer_b, fp_b = await answer(worker, "b")
    assert old_a != answer_b and fp_a != fp_b
    assert (await answer(worker, "a"))[1] == fp_a  # the same weights, the same fingerprint
    body = {"model": "a", "messages": ASK, "max_tokens": 64, "stream": True, **IGNORE_EOS, **GREEDY}
    started = [asyncio.Event() for _ in range(8)]
    swapped = asyncio.Event()

    async def stream(i):
        prints, after_swap = set(), [0]

        def seen(event):
            if event == "[DONE]":
                return
            assert "error" not in event, event
            prints.add(event["system_fingerprint"])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                started[i].set()
                after_swap[0] += swapped.is_set()

        try:
            async with aiohttp.ClientSession(headers=AUTH) as s:
                async with s.post(worker.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    await sse_events(r, seen)
        finally:
            started[i].set()  # never leave the swap waiting on a stream that is already over
        return prints, after_swap[0]

    tasks = [asyncio.create_task(stream(i)) for i in range(8)]
    await asyncio.gather(*[e.wait() for e in started])
    await client.load_adapter("a", adapter_dirs["b"])  # swap while all eight are mid-stream
    swapped.set()
    assert (await answer(worker, "a", max_tokens=8))[1] == fp_b  # new requests get the new version at once
    results = await asyncio.gather(*tasks)  # none failed ...
    assert all(prints == {fp_a} for prints, _ in results)  # ... each was served by the version it started on
    assert all(after > 0 for _, after in results)  # ... and was still streaming when the swap returned
    health = await client.health()
    assert health["adapters"]["a"] == adapter_dirs["b"]
    text, fingerprint = await answer(worker, "a")
    assert fingerprint == fp_b and text != old_a  # b's files answer under the name "a"
    await client.load_adapter("a", adapter_dirs["a"])  # restore for other tests
    text, fingerprint = await answer(worker, "a")
    assert fingerprint == fp_a and text != answer_b


async def test_bad_adapter_is_refused_and_the_old_one_keeps_serving(client, adapter_dirs, tmp_path, tiny_base):
    before = await client.chat(ASK, model="b", max_tokens=16, **GREEDY)
    not_peft = tmp_path / "empty"
    not_peft.mkdir()
    incompatible = tmp_path / "wide"
    shutil.copytree(adapter_dirs["a"], incompatible)
    from safetensors.torch import load_file, save_file
    import torch

    weights = load_file(incompatible / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] * 2)
    save_file(weights, incompatible / "adapter_model.safetensors")
    for path, words in ((tmp_path / "missing", "not a directory"), (not_peft, "adapter_config.json"),
                        (incompatible, "incompatible")):
        with pytest.raises(ModelBadRequest) as err:
            await client.load_adapter("b", str(path))
        assert err.value.status == 400 and words in err.value.message
    assert await client.chat(ASK, model="b", max_tokens=16, **GREEDY) == before
    assert (await client.health())["adapters"]["b"] == adapter_dirs["b"]


async def test_unload_in_use_is_refused_and_disconnect_frees_the_slot(worker, client, adapter_dirs):
    generated_before = await metric(worker.url, "loopcord_worker_generation_tokens_total")
    body = {"model": "b", "messages": ASK, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    session = aiohttp.ClientSession(headers=AUTH)
    resp = await session.post(worker.url + "/v1/chat/completions", json=body)
    async for line in resp.content:  # wait for generated text: the request is running
        if b'"content": "' in line and b'"content": ""' not in line:
            break
    with pytest.raises(ModelBadRequest) as err:
        await client.unload_adapter("b")
    assert err.value.status == 409 and "in use" in err.value.message
    resp.close()  # the client goes away mid-stream
    await session.close()
    for _ in range(200):
        if (await client.health())["running"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await client.health())["running"] == 0
    assert await metric(worker.url, "loopcord_worker_num_requests_running") == 0
    generated = await metric(worker.url, "loopcord_worker_generation_tokens_total") - generated_before
    assert generated < LONG, "the abandoned request kept generating to the end"
    await client.unload_adapter("b")  # free now
    assert "b" not in {m["id"] for m in await client.models()}
    await client.load_adapter("b", adapter_dirs["b"])


# ---------------- bad input ----------------

BAD_BODIES = [
    (b"{not json", 400, None),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 400, "messages"),
    ({"messages": ASK, "temperature": -0.5}, 400, "temperature"),
    ({"messages": ASK, "top_p": 0}, 400, "top_p"),
    ({"messages": ASK, "top_p": 1.5}, 400, "top_p"),
    ({"messages": ASK, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": ASK, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": ASK, "stop": 5}, 400, "stop"),
    ({"messages": ASK, "model": "no-such-adapter"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD_BODIES)
async def test_bad_requests_get_openai_errors(worker, body, status, param):
    got, err, _ = await post(worker.url, body)
    assert got == status
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["param"] == param


async def test_prompt_beyond_the_context_names_the_token_counts(worker):
    got, err, _ = await post(worker.url, {"messages": ASK, "max_tokens": 5000})
    assert got == 400 and "2048" in err["error"]["message"] and "5000" in err["error"]["message"]


async def test_adapter_api_bad_bodies(worker):
    assert (await post(worker.url, {"lora_name": "x"}, "/v1/load_lora_adapter"))[0] == 400
    assert (await post(worker.url, {"lora_name": "tiny", "lora_path": "/tmp"}, "/v1/load_lora_adapter"))[0] == 400
    assert (await post(worker.url, {"lora_name": "ghost"}, "/v1/unload_lora_adapter"))[0] == 404


async def test_sleep_refuses_chat_until_woken(client):
    await client.sleep()
    assert (await client.health())["sleeping"] is True
    with pytest.raises(ModelUnavailable) as err:
        await client.chat(ASK, model="tiny", max_tokens=4)
    assert err.value.status == 503 and "asleep" in err.value.message
    await client.wake_up()
    assert await client.chat(ASK, model="tiny", max_tokens=4, **GREEDY)


# ---------------- process lifecycle and the client's errors ----------------


async def test_sigterm_drains_in_flight_stream_then_exits_zero(tiny_base, tmp_path):
    proc = WorkerProcess(["--model", str(tiny_base), *ONE_THREAD], log_path=tmp_path / "w.log").start()
    client = ModelClient(proc.url)
    try:
        pieces, n_tokens = [], 600
        stream = client.stream_chat(ASK, model=str(tiny_base), max_tokens=n_tokens, extra_body=IGNORE_EOS)
        pieces.append(await first_delta(stream))
        proc.terminate()
        await asyncio.sleep(0.3)
        with pytest.raises(ModelUnavailable):  # draining: new work refused (503) or already closed
            await client.chat(ASK, model=str(tiny_base), max_tokens=4)
        async for piece in stream:  # the in-flight answer still completes
            pieces.append(piece)
        assert len("".join(pieces)) > 0
        assert await asyncio.to_thread(proc.proc.wait, 60) == 0
    finally:
        await client.aclose()
        proc.kill()


async def test_client_reports_unavailable_when_nothing_listens():
    client = ModelClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    try:
        with pytest.raises(ModelUnavailable):
            await client.chat(ASK, model="x")
        with pytest.raises(ModelUnavailable):
            await first_delta(client.stream_chat(ASK, model="x"))
        with pytest.raises(ModelUnavailable):
            await client.health()
        with pytest.raises(ModelUnavailable):
            await client.wait_ready(0.5)
    finally:
        await client.aclose()


async def test_full_queue_is_overloaded_and_api_key_is_enforced(tiny_base, tmp_path):
    env = {"LOOPCORD_WORKER_KEY": "sesame"}
    proc = WorkerProcess(["--model", str(tiny_base), "--served-model-name", "tiny", *ONE_THREAD,
                          "--max-batch-size", "1", "--max-queue", "1"], env=env, log_path=tmp_path / "w.log").start()
    client, anonymous = ModelClient(proc.url, api_key="sesame"), ModelClient(proc.url)
    try:
        with pytest.raises(ModelBadRequest) as err:
            await anonymous.chat(ASK, model="tiny", max_tokens=2)
        assert err.value.status == 401
        long = dict(model="tiny", max_tokens=LONG, extra_body=IGNORE_EOS)
        running = client.stream_chat(ASK, **long)
        await first_delta(running)  # occupies the only batch slot
        queued = asyncio.create_task(client.chat(ASK, **long))  # fills the queue of one
        for _ in range(100):
            if (await client.health())["queue_depth"] == 1:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(ModelOverloaded) as err:
            await client.chat(ASK, model="tiny", max_tokens=2)
        assert err.value.status == 429 and err.value.retry_after and err.value.retry_after > 0
        queued.cancel()
        proc.kill()  # the worker dies mid-answer: the stream raises, it does not hang
        with pytest.raises(ModelUnavailable):
            async for _ in running:
                pass
    finally:
        await client.aclose()
        await anonymous.aclose()
        proc.kill()


async def test_the_kv_cache_budget_comes_from_config_and_a_tight_one_queues_instead_of_failing(tiny_base, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("worker:\n  kv_cache_mb: 1\n", encoding="utf-8")
    proc = WorkerProcess(["--config", str(config), "--model", str(tiny_base), "--served-model-name", "tiny",
                          *ONE_THREAD], log_path=tmp_path / "w.log").start()
    client = ModelClient(proc.url)
    try:
        health = await client.health()
        assert health["memory"]["kv_cache_budget_bytes"] == 2**20
        # More long answers at once than 1 MiB of cache holds: they wait their turn, none fails.
        answers = await asyncio.gather(*(client.chat(ASK, model="tiny", max_tokens=300, extra_body=IGNORE_EOS, **GREEDY)
                                         for _ in range(6)))
        assert len(answers) == 6 and all(answers)
    finally:
        await client.aclose()
        proc.kill()
    config.write_text("worker:\n  kv_cache_mb: 0\n", encoding="utf-8")
    bad = WorkerProcess(["--config", str(config), "--model", str(tiny_base), *ONE_THREAD], log_path=tmp_path / "w2.log")
    bad.spawn()
    assert await asyncio.to_thread(bad.proc.wait, 60) == 2
    assert "worker.kv_cache_mb: must be at least 1" in (tmp_path / "w2.log").read_text()
