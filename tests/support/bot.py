"""The real bot (Core + LoopcordBot) against the fake Discord, with helpers to drive it.

`start_bot` writes a config pointing the bot at a FakeDiscord, starts both and returns a
`BotHarness`; `button_id` finds a component's custom id on a message.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from bot.core import Core
from bot.discord_app import LoopcordBot
from devkit.fake_discord import FakeDiscord
from model.config import load_config


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


def button_id(message: dict, label: str) -> str:
    """The custom id of the button labelled `label` on a Discord message."""
    for row in message.get("components") or []:
        for comp in row.get("components") or []:
            if comp.get("label") == label:
                return comp["custom_id"]
    raise AssertionError(f"no button {label!r} in {message.get('components')}")
