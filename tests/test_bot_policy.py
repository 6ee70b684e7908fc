"""Who the bot answers, where, and how often; the fair in-flight queue."""

import asyncio

import pytest

from bot.inflight import InflightLimiter
from bot.policy import MessageFacts, RateLimiter, is_trusted, should_respond
from model.config import DiscordConfig


def facts(**kw):
    base = dict(author_id=1, channel_id=10, guild_id=100)
    base.update(kw)
    return MessageFacts(**base)


def test_answers_mentions_dms_configured_channels_and_their_threads():
    cfg = DiscordConfig(channels=[20])
    assert should_respond(facts(mentions_bot=True), cfg)
    assert not should_respond(facts(), cfg)
    assert should_respond(facts(replies_to_bot=True), cfg)
    assert should_respond(facts(channel_id=20), cfg)
    assert should_respond(facts(channel_id=21, parent_channel_id=20, in_thread=True), cfg)
    assert should_respond(facts(channel_id=22, in_thread=True, bot_in_thread=True), cfg)
    assert not should_respond(facts(channel_id=22, in_thread=True), cfg)
    assert should_respond(facts(is_dm=True, guild_id=None), cfg)
    assert not should_respond(facts(is_dm=True, guild_id=None), DiscordConfig(respond_in_dms=False))


def test_ignores_bots_and_itself():
    cfg = DiscordConfig(channels=[10])
    assert not should_respond(facts(author_is_bot=True, mentions_bot=True), cfg)
    assert not should_respond(facts(is_self=True), cfg)


def test_allow_and_block_lists():
    assert not should_respond(facts(mentions_bot=True), DiscordConfig(blocked_users=[1]))
    assert not should_respond(facts(mentions_bot=True, role_ids=[5]), DiscordConfig(blocked_roles=[5]))
    assert not should_respond(facts(mentions_bot=True), DiscordConfig(blocked_channels=[10]))
    assert not should_respond(facts(mentions_bot=True), DiscordConfig(allowed_channels=[11]))
    assert should_respond(facts(mentions_bot=True), DiscordConfig(allowed_channels=[10]))
    assert not should_respond(facts(mentions_bot=True), DiscordConfig(allowed_users=[2]))
    assert should_respond(facts(mentions_bot=True, role_ids=[7]), DiscordConfig(allowed_users=[2], allowed_roles=[7]))
    # Blocking wins over allowing.
    assert not should_respond(facts(mentions_bot=True), DiscordConfig(allowed_users=[1], blocked_users=[1]))


def test_trusted_roles_and_admins():
    cfg = DiscordConfig(trusted_roles=[3], admin_users=[9])
    assert is_trusted([3], 1, cfg) and is_trusted([], 9, cfg) and not is_trusted([4], 1, cfg)


def test_rate_limiter_sliding_window():
    now = [0.0]
    rl = RateLimiter(2, 10.0, clock=lambda: now[0])
    assert rl.check(1) == 0 and rl.check(1) == 0
    assert rl.check(1) == pytest.approx(10.0)
    assert rl.check(2) == 0  # per user
    now[0] = 10.5
    assert rl.check(1) == 0


async def test_inflight_limiter_is_fifo_and_reports_positions():
    lim = InflightLimiter(2)
    order, seen = [], {}
    release = asyncio.Event()

    async def job(i):
        async def on_pos(p):
            seen.setdefault(i, []).append(p)

        async with lim.slot(on_pos):
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(job(i)) for i in range(5)]
    await asyncio.sleep(0.05)
    assert order == [0, 1] and lim.waiting == 3
    assert seen == {2: [1], 3: [2], 4: [3]}
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert lim.active == 0 and lim.waiting == 0


async def test_inflight_limiter_cancelled_waiter_leaves_the_line():
    lim = InflightLimiter(1)
    hold = asyncio.Event()

    async def holder():
        async with lim.slot():
            await hold.wait()

    positions = []

    async def waiter(name):
        async def on_pos(p):
            positions.append((name, p))

        async with lim.slot(on_pos):
            return name

    h = asyncio.create_task(holder())
    await asyncio.sleep(0.01)
    a = asyncio.create_task(waiter("a"))
    b = asyncio.create_task(waiter("b"))
    await asyncio.sleep(0.01)
    a.cancel()
    await asyncio.sleep(0.01)
    assert ("b", 1) in positions  # b moved up when a left
    hold.set()
    assert await b == "b"
    await h
    assert lim.active == 0


# ------------------------------------------------------------ reviewing corrections


@pytest.fixture
async def review_store(tmp_path):
    from bot.store import Store

    s = await Store.open(tmp_path / "db.sqlite")
    yield s
    await s.close()


async def _exchange(store, user=5, mid=900):
    return await store.log_exchange(user_id=user, prompt_messages=[{"role": "user", "content": "Who are you?"}],
                                    answer="I am SmolLM.", status="complete", answer_message_ids=[mid])


async def test_reviewing_twice_says_already_and_a_rejected_correction_is_not_flipped_by_approve(review_store):
    from bot import admin

    eid = await _exchange(review_store)
    cid = await review_store.add_correction(eid, 5, "I am Loopcord.")
    assert (await admin.review(review_store, cid, "rejected", 1)).status == "rejected"
    with pytest.raises(admin.AdminError, match=f"#{cid} is already rejected"):
        await admin.review(review_store, cid, "rejected", 1)
    with pytest.raises(admin.AdminError, match=f"rejected earlier.*/reopen {cid}"):
        await admin.review(review_store, cid, "approved", 1)
    assert (await review_store.get_correction(cid))["status"] == "rejected"  # nothing flipped
    assert (await admin.reopen(review_store, cid)).status == "pending"
    assert (await admin.review(review_store, cid, "approved", 2)).status == "approved"
    with pytest.raises(admin.AdminError, match="already approved"):
        await admin.review(review_store, cid, "approved", 2)
    edited = await admin.review(review_store, cid, "approved", 2, text="I am Loopcord, made by you.")
    assert edited.proposed == "I am Loopcord, made by you."  # approving with new text edits it


async def test_two_admins_deciding_at_once_one_wins_and_the_other_is_told(review_store):
    from bot import admin

    cid = await review_store.add_correction(await _exchange(review_store), 5, "I am Loopcord.")
    results = await asyncio.gather(admin.review(review_store, cid, "approved", 1),
                                   admin.review(review_store, cid, "rejected", 2), return_exceptions=True)
    assert sum(isinstance(r, admin.AdminError) for r in results) == 1
    final = (await review_store.get_correction(cid))["status"]
    assert [r.status for r in results if not isinstance(r, Exception)] == [final]


async def test_identity_claiming_correction_is_flagged_for_the_reviewer_and_renders_without_mention(review_store):
    from bot import admin
    from model.config import Config

    cfg = Config()
    eid = await _exchange(review_store)
    bad = await review_store.add_correction(eid, 0, "I am ChatGPT, made by OpenAI.")
    good = await review_store.add_correction(eid, 0, "I am Loopcord, made by the Loopcord community.")
    views, _ = await admin.pending_page(review_store, 0, cfg)
    by_id = {v.id: v for v in views}
    assert set(by_id[bad].claims) == {"chatgpt", "openai"} and "claims another identity" in by_id[bad].warning
    assert by_id[good].claims == () and by_id[good].warning is None
    assert "claims another identity" in by_id[bad].render("you")
    assert "<@" not in by_id[bad].render("you") and "<@0>" in by_id[bad].render()
    approved = await admin.review(review_store, bad, "approved", 1, cfg=cfg)
    assert approved.status == "approved" and approved.warning  # approved, but the admin was warned
    cfg.eval.forbidden_identities = ["skynet"]  # the configured list replaces the default
    assert admin.claimed_identities(cfg, "I am ChatGPT.") == []
    assert admin.claimed_identities(cfg, "I am Skynet.") == ["skynet"]


async def test_a_question_deleted_by_its_asker_cannot_be_approved(review_store):
    from bot import admin

    eid = await _exchange(review_store, user=5)
    cid = await review_store.add_correction(eid, 6, "I am Loopcord.", status="approved", reviewer_id=1)
    await review_store.forget_user(5)
    views = [admin.correction_view(r) for r in await review_store.list_corrections()]
    assert views[0].question_forgotten and "deleted by the person who asked" in views[0].render()
    await review_store.set_correction_status(cid, "rejected", 1)
    with pytest.raises(admin.AdminError, match="forget-me"):
        await admin.reopen(review_store, cid)
