"""A scripted OpenAI-compatible chat server: fixed texts over the real OpenAI SSE protocol.

For tests about Discord rendering or failure handling (a long answer, a 429, a stream cut in
the middle) and for benchmarks/bot_bench.py's instant model; the model's own answers are
tested against the real worker (tests/test_bot_worker.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Callable, Optional

from aiohttp import web

FAKE_MODEL_ID = "scripted-base"


@dataclass
class Script:
    """How the scripted server answers the next requests."""

    text: str = "Hello from the scripted model."
    chunk_chars: int = 7
    delay_s: float = 0.0  # between chunks
    status: int = 200  # non-200: an OpenAI error body with this status
    retry_after: Optional[float] = None
    cut_after_chunks: Optional[int] = None  # drop the connection after this many chunks
    respond: Optional[Callable[[list[dict]], str]] = None  # text from the messages


class ScriptedModelServer:
    """An OpenAI-compatible chat server on 127.0.0.1 that streams scripted text."""

    def __init__(self, script: Optional[Script] = None):
        self.script = script or Script()
        self.requests: list[dict] = []
        self.port = 0
        self._runner: Optional[web.AppRunner] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "ScriptedModelServer":
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": FAKE_MODEL_ID, "object": "model", "created": 0, "owned_by": "test", "parent": None}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"loaded": True, "base": FAKE_MODEL_ID, "adapters": {},
                                  "queue_depth": 0, "running": 0})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        s = self.script
        if s.status != 200:
            headers = {"Retry-After": str(s.retry_after)} if s.retry_after is not None else {}
            return web.json_response({"error": {"message": f"scripted status {s.status}",
                                                "type": "rate_limit_error", "param": None,
                                                "code": s.status}}, status=s.status, headers=headers)
        text = s.respond(body["messages"]) if s.respond else s.text
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-1", "object": "chat.completion", "created": created, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def event(delta: dict, finish: Optional[str] = None) -> bytes:
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": created,
                     "model": body["model"],
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        await resp.write(event({"role": "assistant", "content": ""}))
        chunks = [text[i:i + s.chunk_chars] for i in range(0, len(text), s.chunk_chars)]
        for n, piece in enumerate(chunks):
            if s.cut_after_chunks is not None and n >= s.cut_after_chunks:
                request.transport.close()  # the worker "dies" mid-answer
                return resp
            await resp.write(event({"content": piece}))
            if s.delay_s:
                await asyncio.sleep(s.delay_s)
        await resp.write(event({}, "stop"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
