"""The fake Discord behaves like Discord to the real discord.py client.

Each test runs a tiny discord.py Client / CommandTree written here (not the
project's bot) against the fake over real HTTP and a real WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import io

import aiohttp
import discord
import pytest
from discord import app_commands

from devkit.fake_discord import FakeDiscord

READY_TIMEOUT = 15.0


@pytest.fixture
async def fake():
    f = FakeDiscord()
    await f.start()
    f.patch_discord_py()
    yield f
    await f.stop()


@pytest.fixture
def world(fake):
    guild = fake.add_guild("Test")
    trusted = fake.add_role(guild, "Trusted", permissions=0)
    chan = fake.add_channel(guild, "general")
    alice = fake.add_user("alice")
    fake.add_member(guild, alice, roles=[trusted])
    return {"guild": guild, "role": trusted, "chan": chan, "alice": alice}


def make_client(**kwargs) -> discord.Client:
    return discord.Client(intents=discord.Intents.all(), guild_ready_timeout=0.05, **kwargs)


@contextlib.asynccontextmanager
async def running(client: discord.Client, fake: FakeDiscord):
    task = asyncio.create_task(client.start(fake.token))
    try:
        await fake.wait_for(lambda: client.is_ready() or task.done(), timeout=READY_TIMEOUT)
        if task.done():
            task.result()  # surface a login/connect failure
        yield client
    finally:
        await client.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


async def test_ready_carries_guild_channels_and_roles(fake, world):
    client = make_client()
    async with running(client, fake):
        guild = client.get_guild(world["guild"])
        assert guild is not None and guild.name == "Test"
        assert guild.default_role.id == world["guild"]  # @everyone
        assert [r.name for r in guild.roles] == ["@everyone", "Trusted"]
        assert client.get_channel(world["chan"]).name == "general"
        alice = guild.get_member(world["alice"])
        assert alice is not None and alice.get_role(world["role"]) is not None
        assert guild.me is not None and guild.me.id == fake.bot_id and client.user.bot
        assert client.application_id == fake.application_id
    assert fake.unhandled == []


async def test_user_message_gets_a_reply_seen_over_the_gateway(fake, world):
    client = make_client()
    seen_own: list[discord.Message] = []

    @client.event
    async def on_message(message: discord.Message):
        if message.author.id == client.user.id:
            seen_own.append(message)
        elif client.user in message.mentions:
            await message.reply(f"hello {message.author.name}")

    async with running(client, fake):
        msg = await fake.post_message(world["chan"], world["alice"], f"hi <@{fake.bot_id}>")
        reply = await fake.wait_for(lambda: [m for m in fake.messages(world["chan"]) if m["author"]["bot"]])
        assert reply[0]["content"] == "hello alice"
        assert reply[0]["message_reference"]["message_id"] == msg["id"]
        await fake.wait_for(lambda: seen_own)
        assert seen_own[0].author.bot and seen_own[0].reference.message_id == int(msg["id"])
    assert fake.rejections == []


async def test_content_over_2000_chars_is_rejected_and_recorded(fake, world):
    client = make_client()
    async with running(client, fake):
        channel = client.get_channel(world["chan"])
        sent = await channel.send("short")
        with pytest.raises(discord.HTTPException) as err:
            await sent.edit(content="x" * 2001)
        assert err.value.status == 400 and err.value.code == 50035
        with pytest.raises(discord.HTTPException) as empty:
            await fake.wait_for(lambda: True)
            await client.http.send_message(world["chan"], params=discord.http.handle_message_parameters(content=""))
        assert empty.value.code == 50006
    assert fake.message(sent.id)["content"] == "short"
    assert [r["code"] for r in fake.rejections] == [50035, 50006]
    assert "BASE_TYPE_MAX_LENGTH" in fake.rejections[0]["reason"]


async def test_editing_someone_elses_message_or_unknown_ones_is_refused(fake, world):
    client = make_client()
    async with running(client, fake):
        theirs = await fake.post_message(world["chan"], world["alice"], "mine")
        partial = client.get_channel(world["chan"]).get_partial_message(int(theirs["id"]))
        with pytest.raises(discord.Forbidden):
            await partial.edit(content="not yours")
        with pytest.raises(discord.NotFound):
            await client.get_channel(world["chan"]).fetch_message(1234)
    assert [(r["status"], r["code"]) for r in fake.rejections] == [(403, 50005), (404, 10008)]


async def test_hammering_edits_is_rate_limited_but_every_edit_lands(fake, world):
    fake.rate_limit = (5, 1.0)  # a shorter window keeps the test quick; same mechanics as 5 per 5 s
    client = make_client()
    async with running(client, fake):
        channel = client.get_channel(world["chan"])
        messages = [await channel.send(f"m{i}") for i in range(3)]
        # Sends and edits in one channel share Discord's bucket; a client only learns that from
        # the X-RateLimit-Bucket hash, so editing while sending runs into 429s it must wait out.
        edits = [m.edit(content=f"{m.content} edit {k}") for k in range(2) for m in messages]
        sends = [channel.send(f"more {i}") for i in range(4)]
        await asyncio.gather(*edits, *sends)
    assert fake.rate_limited > 0
    for m in messages:
        assert len(fake.message(m.id)["edits"]) == 3  # the original content and both edits
    assert len(fake.messages(world["chan"])) == 7
    assert fake.rejections == []


async def test_slash_command_defer_and_followup(fake, world):
    client = make_client()
    tree = app_commands.CommandTree(client)

    @tree.command(name="ask", description="Ask a question")
    async def ask(interaction: discord.Interaction, question: str):
        await interaction.response.defer(thinking=True)
        await interaction.followup.send(f"answer to {question}")
        await interaction.followup.send("and one more thing", file=discord.File(io.BytesIO(b"\x89PNG"), "chart.png"))

    @tree.command(name="ping", description="Ping")
    async def ping(interaction: discord.Interaction):
        await interaction.response.send_message("pong", ephemeral=True, file=discord.File(io.BytesIO(b"x"), "p.txt"))

    async with running(client, fake):
        guild = client.get_guild(world["guild"])
        tree.copy_global_to(guild=guild)
        await tree.sync(guild=guild)
        assert {(c["name"], c["guild_id"]) for c in fake.commands} == {("ask", str(guild.id)), ("ping", str(guild.id))}
        it = await fake.slash_command(world["chan"], world["alice"], "ask", options={"question": "why"})
        assert (await it.wait_response())["type"] == 5
        await it.wait_followups(2)
        assert it.original["content"] == "answer to why"  # the first followup fills the "thinking" message
        chart = it.followups[1]["attachments"][0]
        assert chart["filename"] == "chart.png" and fake.attachment_bytes(chart) == b"\x89PNG"

        pong = await fake.slash_command(world["chan"], world["alice"], "ping")
        assert (await pong.wait_response())["data"]["content"] == "pong"
        assert pong.original["flags"] & 64 and pong.original["attachments"][0]["filename"] == "p.txt"
    assert fake.rejections == [] and fake.unhandled == []


async def test_interaction_is_acknowledged_once_and_within_three_seconds(fake, world):
    client = make_client()
    tree = app_commands.CommandTree(client)

    @tree.command(name="slow", description="Answers too late")
    async def slow(interaction: discord.Interaction):
        await asyncio.sleep(0.3)
        await interaction.response.send_message("late")

    @tree.command(name="quick", description="Answers in time")
    async def quick(interaction: discord.Interaction):
        await interaction.response.send_message("on time")

    fake.interaction_deadline = 0.2  # Discord's 3 s, shortened so the test stays fast
    async with running(client, fake):
        await tree.sync()
        late = await fake.slash_command(world["chan"], world["alice"], "slow")
        await fake.wait_for(lambda: fake.rejections)
        assert fake.rejections[0]["code"] == 10062 and late.late
        fake.interaction_deadline = 3.0
        it = await fake.slash_command(world["chan"], world["alice"], "quick")
        await it.wait_response()
        # A second callback for the same interaction, as a buggy client would send it.
        url = f"{fake.api_base}/interactions/{it.id}/{it.token}/callback"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json={"type": 4, "data": {"content": "again"}}) as resp:
                assert resp.status == 400 and (await resp.json())["code"] == 40060


async def test_modal_round_trip(fake, world):
    client = make_client()
    tree = app_commands.CommandTree(client)
    submitted: list[str] = []

    class Correction(discord.ui.Modal, title="Suggest a correction"):
        text = discord.ui.TextInput(label="Correct answer", custom_id="correction", style=discord.TextStyle.paragraph)
        note = discord.ui.Label(text="Note", component=discord.ui.TextInput(custom_id="note", required=False))

        async def on_submit(self, interaction: discord.Interaction):
            submitted.append(f"{self.text.value}|{self.note.component.value}")
            await interaction.response.send_message("thanks", ephemeral=True)

    @tree.context_menu(name="Suggest correction")
    async def suggest(interaction: discord.Interaction, message: discord.Message):
        await interaction.response.send_modal(Correction())

    async with running(client, fake):
        await tree.sync()
        target = await fake.post_message(world["chan"], world["alice"], "the sky is green")
        it = await fake.context_menu(world["chan"], world["alice"], "Suggest correction", target_message=target["id"])
        assert (await it.wait_response())["type"] == 9
        done = await fake.submit_modal(it, world["alice"], {"correction": "the sky is blue", "note": "obvious"})
        assert (await done.wait_response())["data"]["content"] == "thanks"
    assert submitted == ["the sky is blue|obvious"]


async def test_button_click_updates_message(fake, world):
    client = make_client()

    class Approve(discord.ui.View):
        @discord.ui.button(label="Approve", custom_id="approve")
        async def approve(self, interaction: discord.Interaction, button: discord.ui.Button):
            await interaction.response.edit_message(content="approved", view=None)

    @client.event
    async def on_message(message: discord.Message):
        if message.content == "review":
            await message.channel.send("pending", view=Approve(timeout=None))

    async with running(client, fake):
        await fake.post_message(world["chan"], world["alice"], "review")
        pending = await fake.wait_for(lambda: [m for m in fake.messages(world["chan"]) if m["content"] == "pending"])
        it = await fake.click_button(world["chan"], pending[0]["id"], world["alice"], "approve")
        assert (await it.wait_response())["type"] == 7
        assert fake.message(pending[0]["id"])["content"] == "approved"
        assert fake.message(pending[0]["id"])["components"] == []


async def test_reactions_arrive_as_raw_events_with_the_emoji(fake, world):
    client = make_client()
    events: list[tuple[str, str, int]] = []

    @client.event
    async def on_raw_reaction_add(payload: discord.RawReactionActionEvent):
        events.append(("add", str(payload.emoji), payload.user_id))

    @client.event
    async def on_raw_reaction_remove(payload: discord.RawReactionActionEvent):
        events.append(("remove", str(payload.emoji), payload.user_id))

    async with running(client, fake):
        sent = await client.get_channel(world["chan"]).send("an answer")
        await sent.add_reaction("✅")
        await fake.add_reaction(world["chan"], sent.id, world["alice"], "👎")
        await fake.remove_reaction(world["chan"], sent.id, world["alice"], "👎")
        await fake.wait_for(lambda: len(events) == 3)
    assert events == [("add", "✅", fake.bot_id), ("add", "👎", world["alice"]), ("remove", "👎", world["alice"])]


async def test_dm_arrives_and_bot_answers_in_dm(fake, world):
    client = make_client()

    @client.event
    async def on_message(message: discord.Message):
        if isinstance(message.channel, discord.DMChannel) and not message.author.bot:
            await message.author.send(f"got {message.content}")

    async with running(client, fake):
        dm = fake.dm_channel(world["alice"])
        await fake.post_message(dm, world["alice"], "secret")
        replies = await fake.wait_for(lambda: [m for m in fake.messages(dm) if m["author"]["bot"]])
        assert replies[0]["content"] == "got secret"


async def test_without_message_content_intent_content_is_blank(fake, world):
    intents = discord.Intents.default()  # no message_content
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)
    contents: list[str] = []

    @client.event
    async def on_message(message: discord.Message):
        contents.append(message.content)

    async with running(client, fake):
        await fake.post_message(world["chan"], world["alice"], "not for you")
        await fake.post_message(world["chan"], world["alice"], f"<@{fake.bot_id}> for you")
        await fake.wait_for(lambda: len(contents) == 2)
    assert contents == ["", f"<@{fake.bot_id}> for you"]


async def test_gateway_disconnect_resumes_and_replays_missed_events(fake, world):
    client = make_client()
    resumed: list[bool] = []
    received: list[str] = []
    @client.event
    async def on_resumed():
        resumed.append(True)

    @client.event
    async def on_message(message: discord.Message):
        received.append(message.content)

    async with running(client, fake):
        await fake.disconnect_gateway()
        await fake.post_message(world["chan"], world["alice"], "while away")
        await fake.wait_for(lambda: resumed and received, timeout=15)
    assert received == ["while away"]


async def test_files_attach_to_channel_messages(fake, world):
    client = make_client()
    async with running(client, fake):
        channel = client.get_channel(world["chan"])
        sent = await channel.send("chart", file=discord.File(io.BytesIO(b"PNGDATA"), "chart.png"))
        assert sent.attachments[0].filename == "chart.png"
        assert await sent.attachments[0].read() == b"PNGDATA"
    stored = fake.message(sent.id)
    assert fake.attachment_bytes(stored["attachments"][0]) == b"PNGDATA"


async def test_wrong_token_is_refused(fake, world):
    client = make_client()
    with pytest.raises(discord.LoginFailure):
        await client.login("not-the-token")
    await client.close()
    assert fake.unhandled == []


async def test_streaming_edits_of_a_deferred_answer_all_land(fake, world):
    fake.rate_limit = (5, 1.0)
    client = make_client()
    tree = app_commands.CommandTree(client)

    @tree.command(name="stream", description="Streams an answer")
    async def stream(interaction: discord.Interaction):
        await interaction.response.defer()
        text = ""
        for word in ["one", "two", "three", "four", "five", "six", "seven"]:
            text += word + " "
            await interaction.edit_original_response(content=text.strip())

    async with running(client, fake):
        await tree.sync()
        it = await fake.slash_command(world["chan"], world["alice"], "stream")
        await fake.wait_for(lambda: it.original and it.original["content"].endswith("seven"))
    assert it.original["edits"][0] == "" and len(it.original["edits"]) == 8
    assert not it.original["flags"] & 128  # no longer "thinking"
    assert fake.rejections == []


async def test_bot_threads_typing_and_permissions(fake, world):
    client = make_client()

    @client.event
    async def on_message(message: discord.Message):
        if message.content == "start a thread":
            async with message.channel.typing():
                thread = await message.create_thread(name="discussion")
            await thread.send("inside")

    async with running(client, fake):
        msg = await fake.post_message(world["chan"], world["alice"], "start a thread")
        inside = await fake.wait_for(lambda: fake.messages(msg["id"]))  # thread id == starter message id
        assert inside[0]["content"] == "inside" and inside[0]["guild_id"] == str(world["guild"])
        assert fake.typing and fake.typing[0][0] == world["chan"]
        await fake.wait_for(lambda: client.get_channel(int(msg["id"])) is not None)

        fake.set_role_permissions(world["guild"], world["guild"], 1 << 10)  # @everyone may only view
        with pytest.raises(discord.Forbidden):
            await client.get_channel(world["chan"]).send("nope")
    assert fake.rejections[-1]["code"] == 50013


async def test_invalidated_session_identifies_again(fake, world):
    client = make_client()
    connects: list[str] = []

    @client.event
    async def on_ready():
        connects.append("ready")

    async with running(client, fake):
        await fake.disconnect_gateway(resumable=False)
        await fake.wait_for(lambda: len(connects) == 2, timeout=15)
        await fake.post_message(world["chan"], world["alice"], "after")
        assert fake.connected


async def test_auto_sharded_client_uses_gateway_bot(fake, world):
    client = discord.AutoShardedClient(intents=discord.Intents.all(), guild_ready_timeout=0.05)
    async with running(client, fake):
        assert client.get_guild(world["guild"]) is not None
    assert ("GET", "/gateway/bot", 200) in fake.requests


async def test_history_and_unknown_routes(fake, world):
    client = make_client()
    async with running(client, fake):
        for i in range(5):
            await fake.post_message(world["chan"], world["alice"], f"m{i}")
        channel = client.get_channel(world["chan"])
        newest_first = [m.content async for m in channel.history(limit=3)]
        assert newest_first == ["m4", "m3", "m2"]
        oldest_first = [m.content async for m in channel.history(limit=None, oldest_first=True)]
        assert oldest_first == [f"m{i}" for i in range(5)]
        with pytest.raises(discord.NotFound):
            await channel.pins()
    assert fake.unhandled and fake.unhandled[0]["method"] == "GET"


async def test_rest_speaks_discords_wire_format(fake, world):
    """Raw HTTP: exact JSON content type, auth, rate-limit headers and the 429 body discord.py needs."""
    fake.rate_limit = (3, 5.0)
    url = f"{fake.api_base}/channels/{world['chan']}/messages"
    auth = {"Authorization": f"Bot {fake.token}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{fake.api_base}/users/@me") as resp:
            assert resp.status == 401
        async with session.post(url, data=b"{not json", headers={**auth, "Content-Type": "application/json"}) as resp:
            assert resp.status == 400 and (await resp.json())["code"] == 50109
        statuses = []
        for i in range(3):
            async with session.post(url, json={"content": f"m{i}"}, headers=auth) as resp:
                statuses.append(resp.status)
                assert resp.headers["Content-Type"] == "application/json"
                assert resp.headers["X-RateLimit-Bucket"] and "X-RateLimit-Reset-After" in resp.headers
                body = await resp.json()
        assert statuses == [200, 200, 429]
        assert body["global"] is False and 0 < body["retry_after"] <= 5.0
        assert resp.headers["Via"] and int(resp.headers["Retry-After"]) >= 1
    assert fake.rate_limited == 1 and len(fake.messages(world["chan"])) == 2


async def test_gateway_protocol_errors_close_with_discords_codes(fake, world):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{fake.gateway_url}?v=10&encoding=json") as ws:
            hello = await ws.receive_json()
            assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] > 0
            await ws.send_json({"op": 1, "d": None})
            assert (await ws.receive_json())["op"] == 11
            await ws.send_json({"op": 8, "d": {"guild_id": str(world["guild"])}})  # before IDENTIFY
            await ws.receive()
            assert ws.close_code == 4003
        async with session.ws_connect(fake.gateway_url) as ws:
            await ws.receive_json()
            await ws.send_json({"op": 2, "d": {"token": "wrong", "intents": 513, "properties": {}}})
            await ws.receive()
            assert ws.close_code == 4004
        async with session.ws_connect(fake.gateway_url) as ws:
            await ws.receive_json()
            await ws.send_json({"op": 2, "d": {"token": fake.token, "intents": 513, "properties": {}}})
            ready = await ws.receive_json()
            assert ready["t"] == "READY" and ready["s"] == 1 and ready["d"]["resume_gateway_url"]
            guild = await ws.receive_json()
            assert guild["t"] == "GUILD_CREATE" and guild["s"] == 2
            await ws.send_json({"op": 8, "d": {"guild_id": str(world["guild"]), "query": "ali", "limit": 0}})
            chunk = await ws.receive_json()
            assert chunk["t"] == "GUILD_MEMBERS_CHUNK" and [m["user"]["username"] for m in chunk["d"]["members"]] == ["alice"]


async def test_lenient_mode_records_but_accepts():
    fake = FakeDiscord(strict=False)
    await fake.start()
    try:
        guild = fake.add_guild("g")
        chan = fake.add_channel(guild, "c")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{fake.api_base}/channels/{chan}/messages", json={"content": "x" * 2001},
                                    headers={"Authorization": f"Bot {fake.token}"}) as resp:
                assert resp.status == 200
        assert len(fake.messages(chan)[0]["content"]) == 2001
        assert [(r["method"], r["code"]) for r in fake.rejections] == [("POST", 50035)]
    finally:
        await fake.stop()


async def test_slash_command_in_a_dm(fake, world):
    client = make_client()
    tree = app_commands.CommandTree(client)
    seen: list[tuple[str, bool]] = []

    @tree.command(name="whoami", description="Who am I")
    async def whoami(interaction: discord.Interaction):
        seen.append((interaction.user.name, isinstance(interaction.channel, discord.DMChannel)))
        await interaction.response.send_message(f"you are {interaction.user.name}")

    async with running(client, fake):
        await tree.sync()
        dm = fake.dm_channel(world["alice"])
        it = await fake.slash_command(dm, world["alice"], "whoami")
        assert (await it.wait_response())["data"]["content"] == "you are alice"
        assert "user" in it.payload and "member" not in it.payload
    assert seen == [("alice", True)]
