"""Test support for the bot: a scripted OpenAI-compatible server and a bot-on-the-fake harness.

`ScriptedModelServer` streams fixed texts over the real OpenAI SSE protocol. It
is used only where the test is about Discord rendering or failure handling (a
long answer, a 429, a stream cut in the middle) and by the benchmark; the
model's own answers are tested against the real worker (test_bot_worker.py).
`BotHarness` runs the real bot (Core + LoopcordBot) against the fake Discord.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml
from aiohttp import web

from bot.core import Core
from bot.discord_app import LoopcordBot
from model.config import load_config
from tests.fake_discord import FakeDiscord

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


@dataclass
class BotHarness:
    """The real bot connected to a FakeDiscord, with a guild, a channel and helpers."""

    fake: FakeDiscord
    core: Core
    bot: LoopcordBot
    guild: int
    channel: int
    task: asyncio.Task
    users: dict[str, int] = field(default_factory=dict)

    def user(self, name: str, roles: Optional[list[int]] = None) -> int:
        if name not in self.users:
            self.users[name] = self.fake.add_user(name)
            self.fake.add_member(self.guild, self.users[name], roles=roles or [])
        return self.users[name]

    def new_channel(self, name: str = "chan") -> int:
        """A fresh channel: Discord rate-limits sends/edits per channel, so busy tests get their own."""
        return self.fake.add_channel(self.guild, name)

    def mention(self, text: str) -> str:
        return f"<@{self.fake.bot_id}> {text}"

    def answers_to(self, request_id, channel=None) -> list[dict]:
        """The bot's messages replying to `request_id`, plus the parts that follow them."""
        out = []
        for m in self.fake.messages(channel or self.channel):
            if m["author"]["id"] != str(self.fake.bot_id):
                continue
            ref = (m.get("message_reference") or {}).get("message_id")
            if ref == str(request_id) or (out and not ref):
                out.append(m)
            elif out:
                break
        return out

    async def exchange_for(self, request_id, timeout: float = 30.0) -> dict:
        """Wait until the answer to `request_id` is logged; returns the exchange row."""

        async def logged():
            rows = await self.core.store._fetchall(
                "SELECT id FROM exchanges WHERE request_message_id = ?", (int(request_id),))
            return rows[0]["id"] if rows else None

        deadline = time.monotonic() + timeout
        while (eid := await logged()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no exchange logged for message {request_id} within {timeout}s")
            await asyncio.sleep(0.05)
        return await self.core.store.get_exchange(eid)

    async def exchange_of_message(self, message_id, timeout: float = 30.0) -> dict:
        """Wait until an answer including Discord message `message_id` is logged."""
        deadline = time.monotonic() + timeout
        while (ex := await self.core.store.exchange_by_message(int(message_id))) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no exchange logged with message {message_id} within {timeout}s")
            await asyncio.sleep(0.05)
        return ex

    async def ask(self, user: int, text: str, channel=None, **kw) -> tuple[dict, dict]:
        """Post `text` (mentioning the bot) and wait for the logged answer."""
        msg = await self.fake.post_message(channel or self.channel, user, self.mention(text), **kw)
        return msg, await self.exchange_for(msg["id"])

    def final_contents(self, exchange: dict) -> list[str]:
        return [self.fake.message(mid)["content"] for mid in exchange["answer_message_ids"]]

    async def close(self) -> None:
        await self.bot.close()
        try:
            await asyncio.wait_for(self.task, 10)
        except (asyncio.TimeoutError, Exception):
            pass
        await self.core.close()
        await self.fake.stop()


def write_config(tmp: Path, fake: FakeDiscord, **sections) -> Path:
    """A config file pointing the bot at the fake Discord; `sections` override/extend it."""
    data = {
        "discord": {"api_base": fake.api_base, "gateway_url": fake.gateway_url,
                    "guild_ready_timeout": 0.05, "edit_interval_s": 0.2,
                    "user_rate_limit": 1000},
        "store": {"path": str(tmp / "loopcord.db")},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


async def start_bot(tmp: Path, fake: Optional[FakeDiscord] = None, setup=None,
                    worker_port: Optional[int] = None, **sections) -> BotHarness:
    """Start the fake Discord, then the bot (Core.create + LoopcordBot) and wait until it is ready.

    `setup(fake, guild, channel) -> dict of config sections` runs before the config is written,
    so tests can put ids (roles, channels) into the config.
    """
    fake = fake or await FakeDiscord().start()
    guild = fake.add_guild("Test guild")
    channel = fake.add_channel(guild, "general")
    if setup is not None:
        for name, values in setup(fake, guild, channel).items():
            sections.setdefault(name, {}).update(values)
    cfg = load_config(write_config(tmp, fake, **sections))
    core = await Core.create(cfg, worker_port=worker_port)
    bot = LoopcordBot(core)
    task = asyncio.create_task(bot.start(fake.token))
    await fake.wait_for(lambda: bot.is_ready() and fake.commands, timeout=30)
    return BotHarness(fake, core, bot, guild, channel, task)
