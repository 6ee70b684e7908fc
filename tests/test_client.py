"""The worker client's contract without a worker: config, import weight, error mapping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from model.client import (ModelBadRequest, ModelClient, ModelError, ModelOverloaded, ModelUnavailable,
                          error_for_status)
from model.config import config_from_dict

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_client_does_not_import_torch():
    code = "import sys, model.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_from_config_uses_url_or_worker_address_and_the_key_env(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sesame")
    cfg = config_from_dict({"worker": {"host": "127.0.0.1", "port": 9123}, "model": {"api_key_env": "MY_KEY"}})
    client = ModelClient.from_config(cfg)
    assert client.base_url == "http://127.0.0.1:9123" and client.api_key == "sesame"
    await client.aclose()
    cfg = config_from_dict({"model": {"url": "http://gpu-box:8000/v1/", "request_timeout_s": 7}})
    client = ModelClient.from_config(cfg)
    assert client.base_url == "http://gpu-box:8000" and client.timeout == 7
    await client.aclose()


def test_statuses_map_to_typed_errors_with_the_servers_message():
    busy = error_for_status(429, "queue full", {"Retry-After": "2"})
    assert isinstance(busy, ModelOverloaded) and busy.retry_after == 2.0 and "queue full" in busy.message
    assert isinstance(error_for_status(503, "asleep"), ModelUnavailable)
    for status in (400, 401, 404, 409):
        err = error_for_status(status, "why")
        assert isinstance(err, ModelBadRequest) and err.status == status and err.message == "why"
    assert type(error_for_status(500, "boom")) is ModelError


# ---------------------------------------------------------------- over the wire
# A raw OpenAI-style server on 127.0.0.1 whose bytes each test chooses: the client must
# follow the SSE and HTTP protocols, not one server's habits.

import asyncio
import json

import pytest
from aiohttp import web

from model.client import SSEDecoder

ASK = [{"role": "user", "content": "hi"}]


def chunk(content=None, finish=None, role=None) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def sse(obj) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


class RawServer:
    """Answers /v1/chat/completions with `handler(request, body)`; records bodies and headers."""

    def __init__(self, handler):
        self.handler = handler
        self.bodies: list[dict] = []
        self.headers: list[dict] = []

    async def __aenter__(self):
        async def chat(request):
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            return await self.handler(request, body)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


async def write_all(request, pieces: list[bytes], *, end=True):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for piece in pieces:
        await resp.write(piece)
        await asyncio.sleep(0)
    if end:
        await resp.write_eof()
    return resp


def test_sse_decoder_reassembles_events_split_anywhere():
    stream = (": keep-alive comment\n\n" + "event: message\r\ndata: {\"a\":\r\ndata: \"é✓\"}\r\n\r\n"
              + "id: 7\nretry: 10\ndata:[DONE]\n\n").encode()
    for step in (1, 2, 3, 5, len(stream)):  # every split, including inside a multi-byte character
        dec = SSEDecoder()
        events = [e for i in range(0, len(stream), step) for e in dec.feed(stream[i:i + step])]
        events += list(dec.close())
        assert events == [("message", '{"a":\n"é✓"}'), (None, "[DONE]")], step


async def test_stream_reads_deltas_split_across_writes_and_sends_the_openai_body():
    text = "Grüße, 世界! " * 3
    pieces = [b": ping\n\n", sse(chunk(role="assistant", content=""))]
    pieces += [sse(chunk(content=text[i:i + 4])) for i in range(0, len(text), 4)]
    pieces += [sse(chunk(finish="stop")), sse({"id": "c1", "choices": [], "usage": {"total_tokens": 3}}), sse("[DONE]")]
    wire = b"".join(pieces)
    odd_splits = [wire[i:i + 13] for i in range(0, len(wire), 13)]  # cuts through lines and UTF-8

    async def handler(request, body):
        return await write_all(request, odd_splits)

    async with RawServer(handler) as server:
        client = ModelClient(server.url + "/v1/", api_key="k3y")
        try:
            got = [d async for d in client.stream_chat(ASK, model="m", max_tokens=5, temperature=0.0,
                                                       extra_body={"ignore_eos": True})]
        finally:
            await client.aclose()
    assert "".join(got) == text
    body = server.bodies[0]
    assert body["stream"] is True and body["model"] == "m" and body["messages"] == ASK
    assert body["max_tokens"] == 5 and body["temperature"] == 0.0 and body["ignore_eos"] is True
    assert "top_p" not in body and "seed" not in body  # unset parameters are left to the server
    assert server.headers[0]["Authorization"] == "Bearer k3y"


@pytest.mark.parametrize("status,headers,kind", [
    (429, {"Retry-After": "3"}, ModelOverloaded), (400, {}, ModelBadRequest), (404, {}, ModelBadRequest),
    (422, {}, ModelBadRequest), (503, {}, ModelUnavailable), (500, {}, ModelError)])
async def test_error_statuses_raise_typed_errors_with_the_servers_words(status, headers, kind):
    async def handler(request, body):
        return web.json_response({"error": {"message": f"nope {status}", "type": "x", "code": status}},
                                 status=status, headers=headers)

    async with RawServer(handler) as server:
        client = ModelClient(server.url)
        try:
            for call in (lambda: client.stream_chat(ASK, model="m").__anext__(),
                         lambda: client.chat(ASK, model="m")):
                with pytest.raises(ModelError) as err:
                    await call()
                assert type(err.value) is kind and err.value.status == status
                assert f"nope {status}" in err.value.message
                if status == 429:
                    assert err.value.retry_after == 3.0
        finally:
            await client.aclose()


async def test_a_stream_cut_mid_answer_raises_unavailable_after_the_text_so_far():
    async def handler(request, body):
        resp = await write_all(request, [sse(chunk(content="half an ")), sse(chunk(content="answer"))], end=False)
        request.transport.close()  # the worker dies mid-answer
        return resp

    async with RawServer(handler) as server:
        client = ModelClient(server.url)
        got = []
        try:
            with pytest.raises(ModelUnavailable):
                async for d in client.stream_chat(ASK, model="m"):
                    got.append(d)
        finally:
            await client.aclose()
    assert "".join(got) == "half an answer"


async def test_a_stream_that_ends_without_finishing_is_cut_off():
    async def handler(request, body):
        return await write_all(request, [sse(chunk(content="partial"))])

    async with RawServer(handler) as server:
        client = ModelClient(server.url)
        try:
            with pytest.raises(ModelUnavailable, match="cut off"):
                [d async for d in client.stream_chat(ASK, model="m")]
        finally:
            await client.aclose()


async def test_a_silent_stream_times_out_instead_of_hanging():
    released = asyncio.Event()

    async def handler(request, body):
        resp = await write_all(request, [sse(chunk(content="then silence"))], end=False)
        await released.wait()
        return resp

    async with RawServer(handler) as server:
        client = ModelClient(server.url, timeout=0.5)
        try:
            with pytest.raises(ModelUnavailable, match="in time"):
                await asyncio.wait_for(_drain(client.stream_chat(ASK, model="m")), 10)
        finally:
            released.set()
            await client.aclose()


async def _drain(stream):
    return [d async for d in stream]


async def test_an_error_event_inside_the_stream_is_a_model_error():
    async def handler(request, body):
        return await write_all(request, [sse(chunk(content="so far")),
                                         sse({"error": {"message": "CUDA out of memory", "code": 500}}),
                                         sse("[DONE]")])

    async with RawServer(handler) as server:
        client = ModelClient(server.url)
        try:
            with pytest.raises(ModelError, match="CUDA out of memory"):
                await _drain(client.stream_chat(ASK, model="m"))
        finally:
            await client.aclose()


async def test_a_server_that_ignores_stream_still_answers_once():
    async def handler(request, body):
        return web.json_response({"id": "c", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}]})

    async with RawServer(handler) as server:
        client = ModelClient(server.url)
        try:
            assert await _drain(client.stream_chat(ASK, model="m")) == ["whole"]
            assert await client.chat(ASK, model="m") == "whole"
        finally:
            await client.aclose()


async def test_many_concurrent_streams_share_one_pool_and_all_finish():
    async def handler(request, body):
        n = body["messages"][0]["content"]
        return await write_all(request, [sse(chunk(content=n)), sse(chunk(finish="stop")), sse("[DONE]")])

    async with RawServer(handler) as server:
        client = ModelClient(server.url, max_connections=8)
        try:
            outs = await asyncio.gather(*(_drain(client.stream_chat([{"role": "user", "content": str(i)}], model="m"))
                                          for i in range(40)))
        finally:
            await client.aclose()
    assert outs == [[str(i)] for i in range(40)]


# ------------------------------------------------------------------ the launcher (model.process)


def _foreign_server():
    """Something else answering /health with 200 on a loopback port (another bot's worker)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "ok", "loaded": true}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_port_in_use_is_an_error_naming_the_port():
    from model.process import WorkerProcess, WorkerStartError

    server = _foreign_server()
    port = server.server_address[1]
    try:
        worker = WorkerProcess(["--model", "/nowhere"], port=port)
        try:
            worker.start(timeout=5)
        except WorkerStartError as exc:
            assert f"port {port}" in str(exc) and "already in use" in str(exc)
        else:
            raise AssertionError("a worker was 'started' on a port another server holds")
        assert worker.proc is None  # nothing was spawned
    finally:
        server.shutdown()


def test_the_start_up_wait_never_adopts_another_processs_server():
    from model.process import WorkerProcess, WorkerStartError

    server = _foreign_server()
    try:
        worker = WorkerProcess(port=server.server_address[1], api_key="this-runs-key")
        # Our "worker" is a child that never listens; the port answers /health all the same.
        worker.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            worker.wait_ready(timeout=1.5)
        except WorkerStartError as exc:
            assert "did not become ready" in str(exc)
        else:
            raise AssertionError("the wait accepted a server that is not our child")
        finally:
            worker.kill()
    finally:
        server.shutdown()


def test_children_find_this_checkout_from_anywhere(tmp_path):
    from model.process import child_env

    out = subprocess.run([sys.executable, "-c", "import model.process, sys; print(model.process.REPO_ROOT)"],
                         cwd=tmp_path, env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(ROOT)


def test_health_is_always_a_dict(tmp_path):
    import asyncio

    from aiohttp import web

    async def scenario():
        bodies = iter([b"", b"[1, 2]", b"not json", b'{"status": "ok"}'])

        async def health(request):
            return web.Response(body=next(bodies))  # vLLM: an empty 200 with no content type

        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        client = ModelClient(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
        try:
            return [await client.health() for _ in range(4)]
        finally:
            await client.aclose()
            await runner.cleanup()

    assert asyncio.run(scenario()) == [{}, {}, {}, {"status": "ok"}]
