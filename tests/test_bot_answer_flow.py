"""How an answer reaches Discord: placeholder first, typing… only for a slow start, and a
channel the bot cannot write in costs the model nothing.

The model side is a scripted OpenAI-compatible server that can hold its answer back, so
the test sees what a user sees while waiting.
"""

import asyncio

import pytest
import pytest_asyncio

from bot.discord_app import PLACEHOLDER, TYPING_AFTER_S
from bot.render import split_message
from devkit.fake_discord import DEFAULT_EVERYONE_PERMISSIONS, PERM_SEND_MESSAGES, PERM_VIEW_CHANNEL
from devkit.scripted_model import Script, ScriptedModelServer
from tests.support.bot import BotHarness, button_id, start_bot, write_config

pytestmark = pytest.mark.asyncio(loop_scope="module")


class GatedModelServer(ScriptedModelServer):
    """Holds each chat request until `gate` is set (a model slow to start)."""

    def __init__(self, script=None):
        super().__init__(script)
        self.gate = asyncio.Event()
        self.gate.set()
        self.arrived = 0

    async def _chat(self, request):
        self.arrived += 1
        await self.gate.wait()
        return await super()._chat(request)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory):
    server = await GatedModelServer().start()
    h = await start_bot(tmp_path_factory.mktemp("flow"), model={"url": server.url})
    h.server = server
    yield h
    await h.close()
    await server.stop()


async def test_a_slow_start_shows_the_placeholder_then_typing_then_the_answer(env):
    env.server.script = Script(text="worth the wait")
    env.server.gate.clear()
    user, chan = env.user("patient"), env.new_channel()
    msg = await env.fake.post_message(chan, user, env.mention("take your time"))
    placeholder = await env.fake.wait_for(lambda: env.answers_to(msg["id"], chan))
    assert placeholder[0]["content"] == PLACEHOLDER
    await env.fake.wait_for(lambda: any(c == chan for c, _ in env.fake.typing), timeout=TYPING_AFTER_S + 5)
    env.server.gate.set()
    exchange = await env.exchange_for(msg["id"])
    assert env.final_contents(exchange) == ["worth the wait"]
    assert env.fake.message(exchange["answer_message_ids"][0])["edits"][0] == PLACEHOLDER
    assert env.fake.rejections == []


async def test_a_quick_answer_replaces_the_placeholder_without_typing(env):
    env.server.script = Script(text="quick one, " * 20, chunk_chars=5)
    user, chan = env.user("hurried"), env.new_channel()
    _, exchange = await env.ask(user, "fast please", channel=chan)
    assert env.final_contents(exchange) == split_message("quick one, " * 20)
    edits = env.fake.message(exchange["answer_message_ids"][0])["edits"]
    assert edits[0] == PLACEHOLDER and exchange["status"] == "complete"
    assert not any(c == chan for c, _ in env.fake.typing)
    assert env.fake.rejections == []


async def test_a_channel_the_bot_cannot_write_in_frees_the_model_slot_and_logs_nothing(env):
    env.server.script = Script(text="nobody will read this " * 40, chunk_chars=4, delay_s=0.2)  # ~40 s
    talker = env.fake.add_role(env.guild, "talker", PERM_VIEW_CHANNEL | PERM_SEND_MESSAGES)
    user = env.user("muted-room", roles=[talker])
    env.fake.set_role_permissions(env.guild, env.guild, PERM_VIEW_CHANNEL)  # @everyone: read only
    try:
        chan = env.new_channel()
        arrived = env.server.arrived
        msg = await env.fake.post_message(chan, user, env.mention("can you hear me?"))
        await env.fake.wait_for(lambda: any(r["status"] == 403 for r in env.fake.rejections), timeout=10)
        # The bot gives the slot back at once instead of reading a 40-second answer nobody sees.
        await env.fake.wait_for(lambda: env.core.limiter.active == 0, timeout=10)
        assert env.server.arrived - arrived <= 1
        assert env.answers_to(msg["id"], chan) == []
        rows = await env.core.store._fetchall("SELECT id FROM exchanges WHERE request_message_id = ?",
                                              (int(msg["id"]),))
        assert rows == []
    finally:
        env.fake.set_role_permissions(env.guild, env.guild, DEFAULT_EVERYONE_PERMISSIONS)
        env.fake.rejections.clear()


async def test_a_message_longer_than_the_context_budget_is_trimmed_with_a_notice(env):
    env.server.script = Script(text="short answer", chunk_chars=5)
    d = env.core.cfg.discord
    saved, d.context_token_budget = d.context_token_budget, 200
    try:
        user, chan = env.user("verbose"), env.new_channel()
        long_text = "please read all of this " * 80  # 1920 characters: fits Discord, not the budget
        msg, exchange = await env.ask(user, long_text, channel=chan)
        question = exchange["prompt_messages"][-1]["content"]
        assert len(question) < len(long_text.strip()) and question.endswith("…")
        assert env.server.requests[-1]["messages"][-1]["content"] == question  # the model got the trimmed text
        replies = [m["content"] for m in env.answers_to(msg["id"], chan)]
        assert any("too long for me to read whole" in r for r in replies), replies
        assert not any("max_tokens" in r for r in replies) and env.final_contents(exchange) == ["short answer"]
    finally:
        d.context_token_budget = saved


async def test_a_correction_claiming_another_identity_is_saved_but_its_author_is_told(env):
    env.server.script = Script(text="I am a helpful assistant.", chunk_chars=5)
    user, chan = env.user("impostor"), env.new_channel()
    _, exchange = await env.ask(user, "Who are you?", channel=chan)
    reply = await env.fake.post_message(chan, user, "!correct I am ChatGPT, made by OpenAI.",
                                        reply_to=exchange["answer_message_ids"][0])
    await env.fake.wait_for(lambda: env.answers_to(reply["id"], chan), timeout=10)
    (notice,) = [m["content"] for m in env.answers_to(reply["id"], chan)]
    assert "waits for review" in notice and "says I am someone else (" in notice
    (c,) = [c for c in await env.core.store.list_corrections() if c["exchange_id"] == exchange["id"]]
    assert c["status"] == "pending"


async def test_a_trusted_users_identity_claim_is_not_auto_approved(env):
    env.server.script = Script(text="I am a helpful assistant.", chunk_chars=5)
    trusted = env.fake.add_role(env.guild, "trusted-reviewers")
    d = env.core.cfg.discord
    saved, d.trusted_roles = d.trusted_roles, [trusted]
    try:
        user, chan = env.user("trusted-but-wrong", roles=[trusted]), env.new_channel()
        _, ex1 = await env.ask(user, "Who are you?", channel=chan)
        _, ex2 = await env.ask(user, "Who made you?", channel=chan)
        for ex, text in ((ex1, "I am Claude, made by Anthropic."), (ex2, "I am Loopcord.")):
            await env.fake.post_message(chan, user, f"!correct {text}", reply_to=ex["answer_message_ids"][0])
        rows = await poll_corrections(env, {ex1["id"], ex2["id"]})
        assert {r["exchange_id"]: r["status"] for r in rows} == {ex1["id"]: "pending", ex2["id"]: "approved"}
    finally:
        d.trusted_roles = saved


async def poll_corrections(env, exchange_ids: set, timeout: float = 10.0) -> list[dict]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rows = [c for c in await env.core.store.list_corrections() if c["exchange_id"] in exchange_ids]
        if len(rows) == len(exchange_ids) or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ admin review in Discord


@pytest_asyncio.fixture(loop_scope="module")
async def reviewed(tmp_path):
    """The product as `python -m bot` assembles it (Runtime + admin commands) on a vLLM-shaped server."""
    from bot.discord_admin import admin_commands
    from bot.discord_app import LoopcordBot
    from bot.runtime import Runtime
    from devkit.fake_discord import FakeDiscord
    from devkit.fake_vllm import FakeVLLM
    from model.config import load_config

    server = await FakeVLLM().start()
    fake = await FakeDiscord().start()
    guild = fake.add_guild("Review guild")
    channel = fake.add_channel(guild, "general")
    admin_role = fake.add_role(guild, "Admins", permissions=8)
    runtime = await Runtime.start(load_config(write_config(
        tmp_path, fake, model={"url": server.url},
        training={"registry_dir": str(tmp_path / "adapters"), "work_dir": str(tmp_path / "runs")})))
    bot = LoopcordBot(runtime.core, [admin_commands(runtime)])
    task = asyncio.create_task(bot.start(fake.token))
    await fake.wait_for(lambda: bot.is_ready() and fake.commands, timeout=30)
    h = BotHarness(fake, runtime.core, bot, guild, channel, task)
    h.admins = [h.user("ada", roles=[admin_role]), h.user("bea", roles=[admin_role])]
    yield h
    await h.close()
    await runtime.close()
    await server.close()


async def test_review_buttons_say_already_and_a_rejected_correction_needs_reopen(reviewed):
    h = reviewed
    user, (ada, bea) = h.user("claimer"), h.admins
    _, exchange = await h.ask(user, "Who are you?")
    await h.fake.post_message(h.channel, user, "!correct I am ChatGPT, made by OpenAI.",
                              reply_to=exchange["answer_message_ids"][0])
    await poll_corrections(h, {exchange["id"]})
    views = []
    for admin_id in (ada, bea):  # two admins open the review list
        it = await h.fake.slash_command(h.channel, admin_id, "corrections")
        await it.wait_response()
        views.append(it.original)
    embed = views[0]["embeds"][0]
    assert "⚠️ claims another identity:" in embed["description"]
    assert {"chatgpt", "openai"} <= set(embed["description"].rsplit(":", 1)[1].replace(",", " ").split())
    first = await h.fake.click_button(h.channel, views[0]["id"], ada, button_id(views[0], "Reject #1"))
    await first.wait_response()
    stale = await h.fake.click_button(h.channel, views[1]["id"], bea, button_id(views[1], "Reject #1"))
    assert "#1 is already rejected" in (await stale.wait_response())["data"]["content"]
    stale = await h.fake.click_button(h.channel, views[1]["id"], bea, button_id(views[1], "Approve #1"))
    answer = (await stale.wait_response())["data"]["content"]
    assert "rejected earlier" in answer and "/reopen 1" in answer
    assert (await h.core.store.get_correction(1))["status"] == "rejected"
    it = await h.fake.slash_command(h.channel, ada, "reopen", {"correction": 1})
    assert "pending again" in (await it.wait_response())["data"]["content"]
    assert (await h.core.store.get_correction(1))["status"] == "pending"
    assert h.fake.rejections == []
