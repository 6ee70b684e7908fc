"""The whole bot with the REAL model worker: the bot's supervisor starts `python -m model serve`
on the tiny base model as a child process; discord.py talks to the fake Discord over the wire.
"""

import asyncio
import os
import signal

import pytest
import pytest_asyncio

from bot.core import MSG_RESTARTING, MSG_UNREACHABLE
from bot.render import DISCORD_MESSAGE_LIMIT, split_message
from model.process import free_port
from tests.support.bot import start_bot

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]  # real worker processes

MAX_TOKENS = 40


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory, tiny_base):
    ids = {}

    def setup(fake, guild, channel):
        ids["trusted"] = fake.add_role(guild, "Trusted")
        return {"discord": {"trusted_roles": [ids["trusted"]]},
                "model": {"base": str(tiny_base), "temperature": 0.0, "max_tokens": MAX_TOKENS},
                "worker": {"startup_timeout_s": 120.0, "drain_timeout_s": 5.0}}

    h = await start_bot(tmp_path_factory.mktemp("bot"), setup=setup, worker_port=free_port())
    h.trusted_role = ids["trusted"]
    yield h
    await h.close()


@pytest.fixture(autouse=True)
def no_discord_violations(env):
    yield
    assert env.fake.rejections == []
    assert env.fake.unhandled == []


async def test_mention_gets_the_workers_greedy_answer_streamed(env):
    chan = env.new_channel()
    _, exchange = await env.ask(env.user("alice"), "What is the capital of France?", channel=chan)
    assert exchange["status"] == "complete" and exchange["answer"].strip()
    # The same prompt, asked directly and greedily, gives the same text.
    direct = await env.core.client.chat(exchange["prompt_messages"], model=exchange["model"],
                                        max_tokens=MAX_TOKENS, temperature=0.0)
    assert exchange["answer"] == direct
    assert env.final_contents(exchange) == split_message(direct)
    assert exchange["prompt_messages"][0] == {"role": "system", "content": env.core.cfg.identity.system}
    assert exchange["prompt_messages"][-1] == {"role": "user", "content": "What is the capital of France?"}
    assert exchange["ttft_ms"] > 0 and exchange["total_ms"] >= exchange["ttft_ms"]
    for m in env.fake.messages(chan):
        assert all(len(v) <= DISCORD_MESSAGE_LIMIT for v in m["edits"])


async def test_reply_chain_carries_the_earlier_turns_in_order(env):
    chan, bob = env.new_channel(), env.user("bob")
    q1, ex1 = await env.ask(bob, "Tell me about cats.", channel=chan)
    q2 = await env.fake.post_message(chan, bob, "And dogs?", reply_to=ex1["answer_message_ids"][-1])
    ex2 = await env.exchange_for(q2["id"])
    assert ex2["prompt_messages"] == [
        {"role": "system", "content": env.core.cfg.identity.system},
        {"role": "user", "content": "Tell me about cats."},
        {"role": "assistant", "content": ex1["answer"]},
        {"role": "user", "content": "And dogs?"},
    ]


async def test_thumbs_down_records_a_flag_and_removing_it_deletes_it(env):
    chan, carol = env.new_channel(), env.user("carol")
    _, ex = await env.ask(env.user("dave"), "Say hi.", channel=chan)
    answer_id = ex["answer_message_ids"][0]
    await env.fake.add_reaction(chan, answer_id, carol, "👎")
    await env.fake.add_reaction(chan, answer_id, carol, "👍")
    await env.fake.add_reaction(chan, answer_id, carol, "🎉")  # not feedback
    flags = await poll(lambda: env.core.store.list_flags(ex["id"]), lambda f: len(f) == 2)
    assert {(f["user_id"], f["kind"], f["emoji"]) for f in flags} == {(carol, "bad", "👎"), (carol, "good", "👍")}
    await env.fake.remove_reaction(chan, answer_id, carol, "👎")
    flags = await poll(lambda: env.core.store.list_flags(ex["id"]), lambda f: len(f) == 1)
    assert flags[0]["kind"] == "good"


async def test_context_menu_modal_stores_a_pending_correction(env):
    chan, erin = env.new_channel(), env.user("erin")
    _, ex = await env.ask(erin, "Who are you?", channel=chan)
    it = await env.fake.context_menu(chan, erin, "Suggest correction", target_message=ex["answer_message_ids"][0])
    await it.wait_response()
    assert it.modal is not None
    done = await env.fake.submit_modal(it, erin, {"correction": "I am Loopcord."})
    response = await done.wait_response()
    assert "waits for review" in response["data"]["content"]
    (c,) = [c for c in await env.core.store.list_corrections() if c["exchange_id"] == ex["id"]]
    assert c["status"] == "pending" and c["text"] == "I am Loopcord." and c["user_id"] == erin


async def test_trusted_roles_correction_is_approved_and_prefix_form_works(env):
    chan = env.new_channel()
    frank = env.user("frank", roles=[env.trusted_role])
    _, ex = await env.ask(env.user("gina"), "What is 2+2?", channel=chan)
    reply = await env.fake.post_message(chan, frank, "!correct 2+2 is 4.", reply_to=ex["answer_message_ids"][0])
    corr = await poll(lambda: env.core.store.list_corrections("approved"),
                      lambda cs: any(c["exchange_id"] == ex["id"] for c in cs))
    (c,) = [c for c in corr if c["exchange_id"] == ex["id"]]
    assert c["text"] == "2+2 is 4." and c["reviewer_id"] == frank
    await env.fake.wait_for(lambda: env.fake.message(reply["id"])["reactions"])
    assert env.fake.message(reply["id"])["reactions"][0]["emoji"]["name"] == "✅"
    exported = await env.core.store.export_approved_corrections()
    assert any(e["correction"] == "2+2 is 4." and e["messages"] == ex["prompt_messages"] for e in exported)


async def test_forget_me_deletes_that_users_rows_and_no_one_elses(env):
    chan, hank, ivy = env.new_channel(), env.user("hank"), env.user("ivy")
    _, ex_h = await env.ask(hank, "Hello from hank", channel=chan)
    _, ex_i = await env.ask(ivy, "Hello from ivy", channel=env.new_channel())
    await env.core.store.add_flag(ex_i["id"], hank, "bad", "👎")
    await env.core.store.add_flag(ex_i["id"], ivy, "good", "👍")
    it = await env.fake.slash_command(chan, hank, "forget-me")
    response = await it.wait_response()
    assert "deleted 2 stored rows" in response["data"]["content"]
    assert response["data"]["flags"] & 64  # ephemeral
    assert await env.core.store.get_exchange(ex_h["id"]) is None
    assert await env.core.store.get_exchange(ex_i["id"]) is not None
    assert [f["user_id"] for f in await env.core.store.list_flags(ex_i["id"])] == [ivy]


async def test_200_reactions_at_once_are_all_recorded(env):
    chan = env.new_channel()
    _, ex = await env.ask(env.user("jack"), "Rate me.", channel=chan)
    users = [env.user(f"reactor{i}") for i in range(200)]
    answer_id = ex["answer_message_ids"][0]
    await asyncio.gather(*(env.fake.add_reaction(chan, answer_id, u, "👎") for u in users))
    flags = await poll(lambda: env.core.store.list_flags(ex["id"]), lambda f: len(f) == 200, timeout=30)
    assert {f["user_id"] for f in flags} == set(users)


async def test_dead_worker_is_reported_in_words_and_restarted(env):
    sup = env.core.supervisor
    old_pid = sup.pid
    os.kill(old_pid, signal.SIGKILL)
    await env.fake.wait_for(lambda: sup.state == "restarting", timeout=10)
    chan = env.new_channel()
    _, ex = await env.ask(env.user("kim"), "Are you there?", channel=chan)
    assert ex["status"] == "error"
    (content,) = env.final_contents(ex)
    assert content in (MSG_RESTARTING, MSG_UNREACHABLE)
    await env.fake.wait_for(lambda: sup.state == "ready", timeout=90)
    assert sup.pid != old_pid and sup.restarts == 1
    assert not env.bot.is_closed()
    _, ex = await env.ask(env.user("kim"), "Are you back?", channel=chan)
    assert ex["status"] == "complete"


async def poll(fetch, ok, timeout=10.0):
    """Await `fetch()` until `ok(result)`; returns the result."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await fetch()
        if ok(result):
            return result
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {result!r}")
        await asyncio.sleep(0.05)
