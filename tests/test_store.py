"""The SQLite store: migrations, answers mapped back from any message, feedback, privacy."""

import asyncio
import sqlite3

import pytest

from bot.store import MIGRATIONS, Store, StoreError

PROMPT = [{"role": "system", "content": "You are Loopcord."}, {"role": "user", "content": "2+2?"}]


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(tmp_path / "sub" / "loopcord.db")
    yield s
    await s.close()


async def log(store, user=1, ids=(1001, 1002), answer="5"):
    return await store.log_exchange(user_id=user, guild_id=9, channel_id=10, request_message_id=1000,
                                    answer_message_ids=ids, prompt_messages=PROMPT, answer=answer,
                                    status="complete", model="loopcord", adapter_version="v3",
                                    ttft_ms=12.5, total_ms=80.0)


async def test_fresh_store_is_at_latest_schema_with_wal(store, tmp_path):
    assert await store.schema_version() == len(MIGRATIONS)
    con = sqlite3.connect(tmp_path / "sub" / "loopcord.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"exchanges", "flags", "corrections", "training_runs"} <= tables


async def test_reopen_keeps_data_and_does_not_remigrate(tmp_path):
    s = await Store.open(tmp_path / "db.sqlite")
    eid = await log(s)
    await s.close()
    s = await Store.open(tmp_path / "db.sqlite")
    assert (await s.get_exchange(eid))["answer"] == "5"
    await s.close()


async def test_newer_schema_is_refused_with_path(tmp_path):
    path = tmp_path / "db.sqlite"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=str(path)):
        await Store.open(path)


async def test_unopenable_path_names_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open the store at .*file"):
        await Store.open(blocker / "db.sqlite")


async def test_not_a_database_names_it(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="junk.db"):
        await Store.open(path)


async def test_exchange_found_from_any_answer_part(store):
    eid = await log(store)
    for mid in (1001, 1002):
        ex = await store.exchange_by_message(mid)
        assert ex["id"] == eid and ex["prompt_messages"] == PROMPT
        assert ex["answer_message_ids"] == [1001, 1002]
    assert await store.exchange_by_message(1000) is None


async def test_flags_unique_per_user_and_emoji_and_removable(store):
    eid = await log(store)
    assert await store.add_flag(eid, 5, "bad", "👎")
    assert not await store.add_flag(eid, 5, "bad", "👎")
    assert await store.add_flag(eid, 6, "bad", "👎")
    assert await store.add_flag(eid, 6, "good", "👍")
    assert await store.count_flags_by_kind() == {"bad": 2, "good": 1}
    assert await store.remove_flag(eid, 5, "👎")
    assert await store.count_flags_by_kind() == {"bad": 1, "good": 1}


async def test_corrections_review_and_export(store):
    eid = await log(store)
    c1 = await store.add_correction(eid, 5, "4")
    c2 = await store.add_correction(eid, 6, "four", status="approved", reviewer_id=6, reason="auto")
    assert await store.count_corrections_by_status() == {"pending": 1, "approved": 1, "rejected": 0}
    listed = await store.list_corrections("pending")
    assert [c["id"] for c in listed] == [c1]
    assert listed[0]["question"] == "2+2?" and listed[0]["bad_answer"] == "5"
    assert await store.set_correction_status(c1, "approved", reviewer_id=99, text="4 (edited)")
    assert not await store.set_correction_status(12345, "approved", reviewer_id=99)
    exported = await store.export_approved_corrections()
    assert [e["correction"] for e in exported] == ["4 (edited)", "four"]
    e = exported[0]
    assert set(e) == {"id", "exchange_id", "messages", "bad_answer", "correction", "user_id",
                      "approved_by", "created_at", "approved_at"}
    assert e["messages"] == PROMPT and e["approved_by"] == 99 and e["approved_at"].endswith("+00:00")
    run = await store.start_run("manual", started_by=99, parent_version="v3", n_corrections=2)
    assert (await store.running_run())["id"] == run
    assert await store.count_untrained_approved() == 2
    await store.mark_corrections_trained(run, [c1])
    assert await store.count_untrained_approved() == 1
    assert [e["id"] for e in await store.export_approved_corrections(only_untrained=True)] == [c2]
    await store.finish_run(run, "succeeded", version="v4", report={"ok": True}, message="promoted")
    last = await store.last_run()
    assert last["status"] == "succeeded" and last["version"] == "v4" and last["report"] == {"ok": True}
    assert await store.running_run() is None


async def test_forget_user_deletes_only_their_rows(store):
    mine = await log(store, user=1, ids=(11,))
    theirs = await log(store, user=2, ids=(22,))
    await store.add_flag(mine, 2, "bad", "👎")       # other's flag on my exchange: goes with it
    await store.add_flag(theirs, 1, "bad", "👎")     # my flag on their exchange: goes
    await store.add_flag(theirs, 3, "bad", "👎")     # unrelated: stays
    await store.add_correction(theirs, 1, "mine")
    await store.add_correction(theirs, 3, "keep", status="approved", reviewer_id=1)
    counts = await store.forget_user(1)
    assert counts == {"flags": 2, "corrections": 1, "exchanges": 1}
    assert await store.get_exchange(mine) is None
    assert await store.get_exchange(theirs) is not None
    assert await store.count_flags_by_kind() == {"bad": 1, "good": 0}
    left = await store.list_corrections()
    assert [c["text"] for c in left] == ["keep"] and left[0]["reviewer_id"] is None


async def test_concurrent_writes_lose_nothing(store):
    eids = await asyncio.gather(*(log(store, user=u, ids=(5000 + u,)) for u in range(50)))
    assert len(set(eids)) == 50
    await asyncio.gather(*(store.add_flag(eids[i % 50], u, "bad", "👎") for u in range(40) for i in range(5)))
    assert await store.count_flags_by_kind() == {"bad": 200, "good": 0}


async def test_second_process_writing_meanwhile_is_waited_for(store, tmp_path):
    other = sqlite3.connect(tmp_path / "sub" / "loopcord.db", timeout=0)
    other.execute("BEGIN IMMEDIATE")
    task = asyncio.create_task(log(store))
    await asyncio.sleep(0.3)
    other.commit()
    other.close()
    assert await task > 0


async def test_bad_values_are_rejected_with_the_allowed_ones(store):
    eid = await log(store)
    with pytest.raises(ValueError, match="bad.*good"):
        await store.add_flag(eid, 1, "meh", "x")
    with pytest.raises(ValueError, match="complete"):
        await store.log_exchange(user_id=1, prompt_messages=[], answer="", status="done")
