"""The bot on the fake Discord, answering from a scripted OpenAI-compatible server.

These tests are about what Discord shows — long answers split, queue positions,
errors in words, cut-off answers marked, rate limits, /ask, threads, DMs — so
the model side is a scripted stream (devkit/scripted_model.py).
The model's own answers are tested with the real worker in test_bot_worker.py.
"""


import pytest
import pytest_asyncio

from bot.core import CUT_OFF_MARK, MSG_QUEUED
from bot.render import DISCORD_MESSAGE_LIMIT, split_message
from devkit.scripted_model import Script, ScriptedModelServer
from tests.support.bot import start_bot

pytestmark = pytest.mark.asyncio(loop_scope="module")

LONG_ANSWER = (
    "Here is the plan.\n\n"
    + "\n".join(f"Step {i}: do the thing number {i} carefully and check it." for i in range(40))
    + "\n\n```python\n"
    + "\n".join(f"def f{i}(x):\n    return x * {i}  # multiply" for i in range(60))
    + "\n```\n\nThat's all — 完成了。"
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory):
    server = await ScriptedModelServer().start()
    ids = {}

    def setup(fake, guild, channel):
        ids["busy"] = fake.add_channel(guild, "busy")
        return {"discord": {"channels": [ids["busy"]], "user_rate_limit": 3,
                            "user_rate_window_s": 3600, "max_in_flight": 1},
                "model": {"url": server.url}}

    h = await start_bot(tmp_path_factory.mktemp("bot"), setup=setup)
    h.server = server
    h.busy_channel = ids["busy"]
    yield h
    await h.close()
    await server.stop()


@pytest.fixture(autouse=True)
def no_discord_violations(env):
    yield
    assert env.fake.rejections == []
    assert env.fake.unhandled == []


def all_versions(h, channel):
    return [e for m in h.fake.messages(channel) for e in m["edits"]]


async def test_long_answer_is_split_and_edits_never_exceed_the_limit(env):
    env.server.script = Script(text=LONG_ANSWER, chunk_chars=40, delay_s=0.01)
    user, chan = env.user("long"), env.new_channel()
    _, exchange = await env.ask(user, "give me a long plan", channel=chan)
    assert exchange["answer"] == LONG_ANSWER and exchange["status"] == "complete"
    contents = env.final_contents(exchange)
    assert len(contents) >= 3
    assert contents == split_message(LONG_ANSWER)
    assert contents[1].startswith("```python\n") or contents[2].startswith("```python\n")
    assert all(len(v) <= DISCORD_MESSAGE_LIMIT for v in all_versions(env, chan))
    # It streamed: the first message was edited while the answer grew.
    first = env.fake.message(exchange["answer_message_ids"][0])
    assert len(first["edits"]) >= 3


async def test_overloaded_model_is_explained_in_words(env):
    env.server.script = Script(status=429, retry_after=7)
    msg, exchange = await env.ask(env.user("busy-one"), "hello?", channel=env.new_channel())
    assert exchange["status"] == "error"
    (content,) = env.final_contents(exchange)
    assert "busy" in content and "7 seconds" in content


async def test_answer_cut_mid_stream_is_kept_and_marked(env):
    env.server.script = Script(text="The answer begins well and then " * 5, chunk_chars=10, cut_after_chunks=6)
    _, exchange = await env.ask(env.user("cut"), "tell me", channel=env.new_channel())
    assert exchange["status"] == "cut_off"
    assert exchange["answer"] == ("The answer begins well and then " * 5)[:60]
    (content,) = env.final_contents(exchange)
    assert content == exchange["answer"] + CUT_OFF_MARK


async def test_waiting_users_see_their_queue_position(env):
    env.server.script = Script(text="slow answer " * 10, chunk_chars=12, delay_s=0.05)
    users = [env.user(f"q{i}") for i in range(3)]
    # Separate channels: Discord's per-channel rate limit would otherwise serialise the posts.
    channels = [env.fake.add_channel(env.guild, f"queue-{i}") for i in range(3)]
    msgs = [await env.fake.post_message(c, u, env.mention(f"question {i}"))
            for i, (c, u) in enumerate(zip(channels, users))]
    exchanges = [await env.exchange_for(m["id"]) for m in msgs]
    assert all(e["status"] == "complete" for e in exchanges)
    placeholders = [env.fake.message(e["answer_message_ids"][0])["edits"] for e in exchanges]
    assert MSG_QUEUED.format(position=2) in placeholders[2]
    assert MSG_QUEUED.format(position=1) in placeholders[2]


async def test_rate_limited_user_gets_a_polite_message(env):
    env.server.script = Script(text="ok")
    user, chan = env.user("eager"), env.new_channel()
    for i in range(3):  # own channels: Discord's per-channel limit is not what is tested here
        await env.ask(user, f"q{i}", channel=env.new_channel())
    msg = await env.fake.post_message(chan, user, env.mention("one more"))
    reply = await env.fake.wait_for(lambda: env.answers_to(msg["id"], chan))
    assert "faster than I can keep up" in reply[0]["content"]


async def test_configured_channel_answers_without_mention_and_others_do_not(env):
    env.server.script = Script(text="channel answer")
    user = env.user("chatter")
    ignored = await env.fake.post_message(env.channel, user, "just talking, no mention")
    msg = await env.fake.post_message(env.busy_channel, user, "anyone?")
    exchange = await env.exchange_for(msg["id"])
    assert env.final_contents(exchange) == ["channel answer"]
    assert env.answers_to(ignored["id"]) == []


async def test_bots_are_ignored(env):
    other_bot = env.fake.add_user("otherbot", bot=True)
    env.fake.add_member(env.guild, other_bot)
    ignored = await env.fake.post_message(env.busy_channel, other_bot, env.mention("hi"))
    env.server.script = Script(text="to the human")
    msg = await env.fake.post_message(env.busy_channel, env.user("human"), "hi")
    await env.exchange_for(msg["id"])
    assert env.answers_to(ignored["id"], env.busy_channel) == []


async def test_thread_of_configured_channel_uses_thread_history(env):
    env.server.script = Script(respond=lambda msgs: f"seen {len(msgs)} messages")
    user = env.user("threader")
    thread = env.fake.add_thread(env.busy_channel, "topic", owner=user)
    # The fake dispatches THREAD_CREATE from a task; Discord sends it before any message in it.
    await env.fake.wait_for(lambda: env.bot.get_channel(thread))
    first = await env.fake.post_message(thread, user, "first thought")
    await env.exchange_for(first["id"])
    second = await env.fake.post_message(thread, user, "second thought")
    exchange = await env.exchange_for(second["id"])
    roles = [m["role"] for m in exchange["prompt_messages"]]
    contents = [m["content"] for m in exchange["prompt_messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert contents[1:] == ["first thought", "seen 2 messages", "second thought"]


async def test_direct_messages_are_answered(env):
    env.server.script = Script(text="dm answer")
    user = env.user("dmer")
    dm = env.fake.dm_channel(user)
    msg = await env.fake.post_message(dm, user, "hello in private")
    exchange = await env.exchange_for(msg["id"])
    assert env.final_contents(exchange) == ["dm answer"]
    assert exchange["guild_id"] is None


async def test_ask_slash_command_streams_into_the_response_and_followups(env):
    env.server.script = Script(text=LONG_ANSWER, chunk_chars=200)
    user = env.user("slasher")
    it = await env.fake.slash_command(env.new_channel(), user, "ask", options={"question": "long please"})
    await it.wait_response()
    await env.fake.wait_for(lambda: it.original and it.original["content"] == split_message(LONG_ANSWER)[0]
                            and len(it.followups) == len(split_message(LONG_ANSWER)) - 1, timeout=20)
    assert [f["content"] for f in it.followups] == split_message(LONG_ANSWER)[1:]
    exchange = await env.exchange_of_message(it.followups[-1]["id"])
    assert exchange["answer"] == LONG_ANSWER
    assert exchange["prompt_messages"][-1] == {"role": "user", "content": "long please"}
