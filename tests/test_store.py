"""The SQLite store: migrations, answers mapped back from any message, feedback, privacy."""

import asyncio
import json
import os
import sqlite3
import stat

import pytest

from bot.store import MIGRATIONS, Store, StoreError, StoreFull, TooManyPending

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
    forgotten = await store.forget_user(1)
    assert forgotten.counts == {"flags": 2, "corrections": 1, "exchanges": 1, "exchanges_blanked": 0,
                                "quotes_erased": 0, "memory": 0}
    assert await store.get_exchange(mine) is None
    assert await store.get_exchange(theirs) is not None
    assert await store.count_flags_by_kind() == {"bad": 1, "good": 0}
    left = await store.list_corrections()
    assert [c["text"] for c in left] == ["keep"] and left[0]["reviewer_id"] is None


SECRET_Q = "my-secret-question-zqx"


async def test_forget_keeps_others_corrections_but_not_the_askers_words_and_never_trains_them(store):
    asked = await store.log_exchange(
        user_id=1, prompt_messages=[PROMPT[0], {"role": "user", "content": SECRET_Q}],
        answer="echo " + SECRET_Q, status="complete", answer_message_ids=[31], request_message_id=30)
    approved = await store.add_correction(asked, 3, "The right answer.", status="approved", reviewer_id=9)
    pending = await store.add_correction(asked, 4, "Another answer.")
    own = await store.add_correction(asked, 1, "my own fix")
    assert await store.count_untrained_approved() == 1
    forgotten = await store.forget_user(1)
    assert forgotten.counts["exchanges_blanked"] == 1 and forgotten.counts["exchanges"] == 0
    assert forgotten.erasure.correction_ids == {approved, pending, own}
    husk = await store.get_exchange(asked)
    assert husk["user_id"] != 1 and husk["prompt_messages"] == [] and husk["answer"] == ""
    assert husk["request_message_id"] is None
    kept = {c["id"]: c for c in await store.list_corrections()}
    assert set(kept) == {approved, pending}  # the others' corrections stay on record
    assert kept[approved]["text"] == "The right answer." and kept[approved]["question"] == ""
    assert kept[pending]["status"] == "rejected" and "forget-me" in kept[pending]["review_reason"]
    # No question, no sample: nothing of it is exported for training again.
    assert await store.export_approved_corrections() == []
    assert await store.count_untrained_approved() == 0


async def test_forgotten_text_is_gone_from_the_database_and_wal_bytes(tmp_path):
    path = tmp_path / "db.sqlite"
    s = await Store.open(path)
    eid = await s.log_exchange(user_id=1, prompt_messages=[{"role": "user", "content": SECRET_Q}],
                               answer="ok", status="complete", answer_message_ids=[41])
    await s.add_correction(eid, 1, "corr-" + SECRET_Q)
    for u in range(2, 30):  # other users' rows share the pages
        await log(s, user=u, ids=(500 + u,))
    raw = lambda: b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("db.sqlite"))
    assert SECRET_Q.encode() in raw()
    await s.forget_user(1)
    assert SECRET_Q.encode() not in raw()
    assert len(await s.list_corrections()) == 0 and await s.get_exchange(eid) is None
    await s.close()
    assert SECRET_Q.encode() not in raw()


async def test_forget_removes_the_users_entries_from_stored_gate_reports(store):
    eid = await log(store, user=1, ids=(51,))
    other = await log(store, user=2, ids=(52,))
    cid = await store.add_correction(eid, 1, SECRET_Q, status="approved", reviewer_id=9)
    keep = await store.add_correction(other, 2, "keep me", status="approved", reviewer_id=9)
    run = await store.start_run("manual")
    items = [{"id": cid, "question": "2+2?", "correction": SECRET_Q, "learned": True},
             {"id": keep, "question": "2+2?", "correction": "keep me", "learned": False}]
    await store.finish_run(run, "succeeded", version="v2", report={"corrections": {"items": items}})
    await store.forget_user(1)
    report = (await store.get_run(run))["report"]
    assert [i["id"] for i in report["corrections"]["items"]] == [keep]


async def test_store_file_and_directory_are_private_under_a_loose_umask(tmp_path):
    old = os.umask(0o022)
    try:
        s = await Store.open(tmp_path / "fresh" / "loopcord.db")
        await log(s)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
    for f in (tmp_path / "fresh").iterdir():  # the database and its -wal / -shm
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
    await s.close()


async def test_existing_world_readable_store_is_tightened(tmp_path):
    path = tmp_path / "db.sqlite"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    s = await Store.open(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    await s.close()


async def test_full_disk_is_reported_as_disk_full_and_the_store_keeps_working(tmp_path):
    s = await Store.open(tmp_path / "db.sqlite")
    eid = await log(s)
    # SQLite's own size cap fails writes with SQLITE_FULL, exactly as a full disk does.
    pages = (await s._fetchone("PRAGMA page_count"))[0]
    await s._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreFull, match="disk full: cannot write to the store at .*db.sqlite"):
        for _ in range(50):
            await s.add_correction(eid, 2, "x" * 20000)
    await s._db.execute("PRAGMA max_page_count = 1000000")
    cid = await s.add_correction(eid, 2, "fits now")  # the connection is usable afterwards
    assert (await s.get_correction(cid))["text"] == "fits now"
    await s.close()


async def test_pending_corrections_per_user_are_capped_even_in_a_burst(store):
    eid = await log(store)
    results = await asyncio.gather(*(store.add_correction(eid, 7, f"c{i}", max_pending=3) for i in range(10)),
                                   return_exceptions=True)
    assert sum(isinstance(r, int) for r in results) == 3
    assert all(isinstance(r, TooManyPending) for r in results if not isinstance(r, int))
    assert "3 corrections waiting for review" in str(next(r for r in results if not isinstance(r, int)))
    await store.add_correction(eid, 8, "another user is not affected", max_pending=3)
    await store.add_correction(eid, 7, "approved ones do not count", status="approved", max_pending=3)
    first = (await store.list_corrections("pending"))[0]
    await store.set_correction_status(first["id"], "rejected", 1)
    await store.add_correction(eid, 7, "room again after a review", max_pending=3)


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


async def test_forget_me_rewrites_run_exports_and_registry_records(tmp_path):
    """The retrain's exported JSONL and the registry's manifest / gate report lose the user's
    corrections (and others' corrections on the user's questions); everything else stays."""
    from bot.privacy import forget_files

    s = await Store.open(tmp_path / "db.sqlite")
    mine = await s.log_exchange(user_id=1, prompt_messages=[{"role": "user", "content": SECRET_Q}],
                                answer="a", status="complete", answer_message_ids=[61])
    other = await log(s, user=2, ids=(62,))
    on_mine = await s.add_correction(mine, 3, "fix by someone else", status="approved", reviewer_id=9)
    keep = await s.add_correction(other, 2, "keep me", status="approved", reviewer_id=9)
    run_file = tmp_path / "runs" / "run-00001" / "corrections.jsonl"
    run_file.parent.mkdir(parents=True)
    run_file.write_text("".join(json.dumps(r) + "\n" for r in await s.export_approved_corrections()))
    version = tmp_path / "registry" / "v0002"
    version.mkdir(parents=True)
    records = [{"id": on_mine, "messages": [{"role": "user", "content": SECRET_Q}], "correction": "fix"},
               {"id": keep, "messages": PROMPT, "correction": "keep me"}]
    (version / "manifest.json").write_text(json.dumps({"version": "v0002", "corrections": records}))
    (version / "eval.json").write_text(json.dumps({"corrections": {"items": [
        {"id": on_mine, "question": SECRET_Q, "correction": "fix", "learned": True}]}}))
    forgotten = await s.forget_user(1)
    files = forget_files(forgotten.erasure, tmp_path / "runs", tmp_path / "registry")
    assert files.files_rewritten == 3
    for f in (run_file, version / "manifest.json", version / "eval.json"):
        assert SECRET_Q not in f.read_text() and "fix by someone else" not in f.read_text()
    assert [json.loads(line)["id"] for line in run_file.read_text().splitlines()] == [keep]
    assert json.loads((version / "manifest.json").read_text())["corrections"][0]["id"] == keep
    assert [r["id"] for r in await s.export_approved_corrections()] == [keep]  # the next replay
    await s.close()


async def test_forget_erases_the_users_words_quoted_in_other_peoples_prompts(tmp_path):
    """In a thread, the next person's prompt carries the earlier messages as history."""
    from bot.privacy import forget_files
    from bot.store import ERASED_TEXT

    s = await Store.open(tmp_path / "db.sqlite")
    system = {"role": "system", "content": "You are Loopcord."}
    mine = await s.log_exchange(user_id=1, prompt_messages=[system, {"role": "user", "content": SECRET_Q}],
                                answer="first answer", status="complete", answer_message_ids=[71])
    history = [system, {"role": "user", "content": SECRET_Q}, {"role": "assistant", "content": "first answer"},
               {"role": "user", "content": "and what about dogs?"}]
    theirs = await s.log_exchange(user_id=2, prompt_messages=history, answer="dogs", status="complete",
                                  answer_message_ids=[72])
    keep = await s.add_correction(theirs, 2, "Dogs are great.", status="approved", reviewer_id=9)
    run_file = tmp_path / "runs" / "run-00001" / "corrections.jsonl"
    run_file.parent.mkdir(parents=True)
    run_file.write_text("".join(json.dumps(r) + "\n" for r in await s.export_approved_corrections()))
    forgotten = await s.forget_user(1)
    assert forgotten.counts["quotes_erased"] == 1 and await s.get_exchange(mine) is None
    prompt = (await s.get_exchange(theirs))["prompt_messages"]
    assert [m["content"] for m in prompt] == ["You are Loopcord.", ERASED_TEXT, "first answer", "and what about dogs?"]
    (exported,) = await s.export_approved_corrections()  # still a sample, with the quote erased
    assert exported["id"] == keep and SECRET_Q not in json.dumps(exported)
    forget_files(forgotten.erasure, tmp_path / "runs", tmp_path / "registry")
    assert SECRET_Q not in run_file.read_text() and "Dogs are great." in run_file.read_text()
    await s.close()
    assert not any(SECRET_Q.encode() in p.read_bytes() for p in tmp_path.iterdir() if p.is_file())


async def test_a_version_2_store_upgrades_keeping_runs_and_what_they_trained(tmp_path):
    """Schema v3 rebuilds training_runs (a run can be "cancelled") with foreign keys off: the
    corrections a run trained keep pointing at it, and the memory table appears empty."""
    from bot.store import _split_statements

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:
        for statement in _split_statements(script):
            con.execute(statement)
    con.execute("PRAGMA user_version = 2")
    con.execute("INSERT INTO exchanges (id, user_id, prompt_messages, answer, status, created_at)"
                " VALUES (1, 5, '[]', 'a', 'complete', 't')")
    con.execute("INSERT INTO training_runs (id, trigger, status, started_at, report) VALUES (7, 'manual', 'succeeded', 't', '{}')")
    con.execute("INSERT INTO corrections (id, exchange_id, user_id, text, status, created_at, trained_run_id)"
                " VALUES (3, 1, 5, 'fact', 'approved', 't', 7)")
    con.commit()
    con.close()
    s = await Store.open(path)
    try:
        assert await s.schema_version() == len(MIGRATIONS) == 3
        assert (await s.get_run(7))["status"] == "succeeded"
        assert (await s.get_correction(3))["trained_run_id"] == 7
        assert await s.count_memory() == 0 and [r["id"] for r in await s.corrections_missing_memory("m")] == [3]
        run = await s.start_run("manual")
        await s.finish_run(run, status="cancelled")
        assert (await s.get_run(run))["status"] == "cancelled"
    finally:
        await s.close()
