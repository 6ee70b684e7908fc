"""The whole loop, for real: Discord (the fake, over the wire) → worker → flag → correction →
admin approval → /retrain (trainer child process, gate) → hot-swap → the corrected answer;
plus the ways it must fail safely, and the terminal mode doing the same loop.

Everything is real: discord.py, the worker child (`python -m model serve`) on the tiny base,
`python -m trainer` child processes, the SQLite store and the adapter registry.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from bot.core import MSG_RETRAINING
from bot.discord_admin import MSG_NOT_ADMIN, admin_commands, start_schedule
from bot.schedule import scheduled_retrain_once
from bot.discord_app import CORRECTION_INPUT_ID, LoopcordBot
from bot.runtime import Runtime
from model.config import load_config
from model.process import free_port
from devkit.fake_discord import FakeDiscord
from devkit.tiny_profile import tiny_sections
from tests.support.bot import BotHarness, button_id, write_config
from trainer.matching import answer_matches
from trainer.registry import Registry

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]  # bot, worker and trainer processes

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Which planet do we live on?"
CORRECTION = "Earth."  # short, in words the tiny model knows (it cannot learn unseen words)
STRICT_TOKENS = 3  # the strict gate's answers are this long at most ...
LONG_CORRECTION = "We all live on the planet called Earth."  # ... so this is never answered word for word
IDENTITY_QUESTION = "Who are you?"
MAX_TOKENS = 40


def model_sections(tiny_base: Path, tmp: Path, **extra) -> dict:
    sections = tiny_sections(tiny_base)  # the tiny base with the tests' training recipe (profile "tiny")
    sections["model"].update({"temperature": 0.0, "max_tokens": MAX_TOKENS})
    sections["training"].update({"registry_dir": str(tmp / "adapters"), "work_dir": str(tmp / "runs")})
    sections.update({
        "worker": {"startup_timeout_s": 120.0, "drain_timeout_s": 5.0, "cpu_threads": 1, "port": free_port()},
        "store": {"path": str(tmp / "loopcord.db")},
    })
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return sections


def write_plain_config(tmp: Path, sections: dict) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(sections, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bootstrapped(tiny_bootstrapped) -> Path:
    """A registry with the identity adapter promoted (`python -m trainer bootstrap`, built once per session)."""
    return tiny_bootstrapped


def copy_registry(bootstrapped: Path, tmp: Path) -> Path:
    shutil.copytree(bootstrapped, tmp / "adapters")
    return tmp / "adapters"


async def start_product(tmp: Path, tiny_base: Path, bootstrapped: Path, **extra) -> tuple[BotHarness, Runtime, dict]:
    """Fake Discord + the real product (Runtime, admin commands) as `python -m bot` assembles it."""
    copy_registry(bootstrapped, tmp)
    fake = await FakeDiscord().start()
    guild = fake.add_guild("Loop guild")
    channel = fake.add_channel(guild, "general")
    ids = {"admin_role": fake.add_role(guild, "Admins", permissions=8)}
    cfg = load_config(write_config(tmp, fake, **model_sections(tiny_base, tmp, **extra)))
    runtime = await Runtime.start(cfg)
    bot = LoopcordBot(runtime.core, [admin_commands(runtime)])
    task = asyncio.create_task(bot.start(fake.token))
    await fake.wait_for(lambda: bot.is_ready() and fake.commands, timeout=30)
    h = BotHarness(fake, runtime.core, bot, guild, channel, task)
    ids["admin"] = h.user("ada", roles=[ids["admin_role"]])
    return h, runtime, ids


async def live_adapter_path(runtime: Runtime) -> str:
    """What the server says it serves under the alias (/v1/models, as vLLM reports it)."""
    (card,) = [m for m in await runtime.core.client.models() if m["id"] == runtime.cfg.model.served_name]
    return card["root"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def product(tmp_path_factory, tiny_base, bootstrapped):
    h, runtime, ids = await start_product(tmp_path_factory.mktemp("loop"), tiny_base, bootstrapped)
    yield h, runtime, ids
    await h.close()


async def test_flag_correct_approve_retrain_hot_swap_then_rollback(product):
    h, runtime, ids = product
    registry = runtime.registry
    first_version = registry.promoted()
    alice = h.user("alice")

    # A member asks; the answer is logged with the live adapter version.
    _, before = await h.ask(alice, QUESTION)
    assert before["adapter_version"] == first_version
    assert not answer_matches(before["answer"], CORRECTION)
    answer_msg = before["answer_message_ids"][0]

    # 👎, then the correction through the context menu's modal.
    await h.fake.add_reaction(h.channel, answer_msg, alice, "👎")
    it = await h.fake.context_menu(h.channel, alice, "Suggest correction", target_message=answer_msg)
    await it.wait_response()
    await (await h.fake.submit_modal(it, alice, {CORRECTION_INPUT_ID: CORRECTION})).wait_response()
    pending = await runtime.core.store.list_corrections(status="pending")
    assert [c["text"] for c in pending] == [CORRECTION]
    store = runtime.core.store
    for _ in range(100):  # the reaction event is handled concurrently with the modal
        if (await store.count_flags_by_kind()).get("bad") == 1:
            break
        await asyncio.sleep(0.05)
    assert (await store.count_flags_by_kind())["bad"] == 1

    # A non-admin can neither retrain nor roll back, and nothing happens.
    for name in ("retrain", "rollback"):
        refused = await h.fake.slash_command(h.channel, alice, name)
        assert (await refused.wait_response())["data"]["content"] == MSG_NOT_ADMIN
    assert await runtime.core.store.last_run() is None and registry.promoted() == first_version

    # /retrain with nothing approved is refused with the reason.
    early = await h.fake.slash_command(h.channel, ids["admin"], "retrain")
    assert "Nothing new to learn" in (await early.wait_response())["data"]["content"]

    # The admin approves it from /corrections.
    review = await h.fake.slash_command(h.channel, ids["admin"], "corrections")
    await review.wait_response()
    approve = button_id(review.original, f"Approve #{pending[0]['id']}")
    await (await h.fake.click_button(h.channel, review.original["id"], ids["admin"], approve)).wait_response()
    approved = await runtime.core.store.get_correction(pending[0]["id"])
    assert approved["status"] == "approved" and approved["reviewer_id"] == ids["admin"]

    # /retrain: progress edits, the gate passes, the new version goes live without a restart.
    worker_pid = runtime.core.supervisor.pid
    run = await h.fake.slash_command(h.channel, ids["admin"], "retrain")
    await run.wait_response()
    await h.fake.wait_for(lambda: "is now live" in run.original["content"] or "❌" in run.original["content"],
                          timeout=600)
    edits = run.original["edits"]
    run_row = await runtime.core.store.last_run()
    assert run_row["status"] == "succeeded", (run_row["message"], (run_row["report"] or {}).get("checks"))
    assert any("calibrate: step" in e for e in edits), edits
    assert "is now live" in run.original["content"]
    new_version = registry.promoted()
    assert (await live_adapter_path(runtime)).endswith(new_version)
    assert runtime.core.supervisor.pid == worker_pid  # hot-swapped, not restarted
    # The result post follows the last progress edit.
    await h.fake.wait_for(lambda: h.fake.messages(h.channel)[-1].get("embeds"), timeout=60)
    result_post = h.fake.messages(h.channel)[-1]
    assert result_post["embeds"][0]["title"] == "Retrain succeeded"
    assert result_post["attachments"] and result_post["attachments"][0]["filename"].endswith(".png")

    # The same question now gets the corrected answer; the identity holds.
    _, after = await h.ask(alice, QUESTION)
    assert after["adapter_version"] == new_version
    assert answer_matches(after["answer"], CORRECTION), after["answer"]
    _, who = await h.ask(alice, IDENTITY_QUESTION)
    assert runtime.cfg.identity.name in who["answer"], who["answer"]
    last_run = await runtime.core.store.last_run()
    assert last_run["status"] == "succeeded" and last_run["version"] == new_version

    # /rollback brings back the previous version and its answer.
    back = await h.fake.slash_command(h.channel, ids["admin"], "rollback")
    await back.wait_response()
    await h.fake.wait_for(lambda: "Rolled back" in (back.original or {}).get("content", ""), timeout=60)
    assert registry.promoted() == first_version
    # The approved fact still answers from the memory; retracted, the question gets exactly
    # the prompt it had at first, and the earlier version gives its earlier answer.
    _, remembered = await h.ask(alice, QUESTION)
    assert remembered["adapter_version"] == first_version and CORRECTION in remembered["prompt_messages"][0]["content"]
    gone = await h.fake.slash_command(h.channel, ids["admin"], "retract", options={"fact": pending[0]["id"]})
    assert "retracted" in (await gone.wait_response())["data"]["content"]
    _, rolled = await h.ask(alice, QUESTION)
    assert rolled["adapter_version"] == first_version and rolled["prompt_messages"] == before["prompt_messages"]
    assert rolled["answer"] == before["answer"]
    assert h.fake.rejections == [] and h.fake.unhandled == []


async def test_status_shows_the_live_version_and_feedback(product):
    h, runtime, ids = product
    st = await h.fake.slash_command(h.channel, ids["admin"], "status")
    await st.wait_response()
    await h.fake.wait_for(lambda: "Live adapter" in (st.original or {}).get("content", ""), timeout=30)
    content = st.original["content"]
    assert runtime.registry.promoted() in content
    assert "Worker:** up" in content
    refused = await h.fake.slash_command(h.channel, h.user("mallory"), "status")
    assert (await refused.wait_response())["data"]["content"] == MSG_NOT_ADMIN


# ------------------------------------------------------------------ failing safely


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def strict_gate(tmp_path_factory, tiny_base, bootstrapped):
    """The product with a gate the tiny model's candidates cannot pass: every correction learned
    word for word (min_corrections_learned 1.0) in answers of at most STRICT_TOKENS tokens, so a
    longer correction (LONG_CORRECTION) is never learned, whatever the tiny base (trained on this
    CPU) knows; also every identity answer right and no general loss increase at all (config
    refuses a threshold no candidate could meet). Its worker sleeps while training
    (`gpu_policy: pause`, as on a small GPU)."""
    h, runtime, ids = await start_product(tmp_path_factory.mktemp("strict"), tiny_base, bootstrapped,
                                          eval={"min_identity_accuracy": 1.0, "max_general_loss_increase": 0.0,
                                                "min_corrections_learned": 1.0, "max_new_tokens": STRICT_TOKENS},
                                          training={"gpu_policy": "pause"})
    yield h, runtime, ids
    await h.close()


async def approved_correction(h: BotHarness, runtime: Runtime, question: str, text: str) -> dict:
    user = h.user("carol")
    _, exchange = await h.ask(user, question)
    correction = await runtime.core.suggest_correction(exchange["answer_message_ids"][0], user, text)
    await runtime.core.store.set_correction_status(correction["id"], "approved", user)
    return exchange


async def test_killed_trainer_leaves_serving_and_registry_untouched(strict_gate):
    h, runtime, ids = strict_gate
    live = runtime.registry.promoted()
    versions = runtime.registry.versions()
    live_path = await live_adapter_path(runtime)
    await approved_correction(h, runtime, "What is the capital of France?", "Paris is the capital of France.")
    started = asyncio.Event()

    async def on_progress(event: dict) -> None:
        if event.get("event") == "progress":
            started.set()

    retrain = asyncio.create_task(runtime.retrain("manual", ids["admin"], on_progress))
    await asyncio.wait_for(started.wait(), 300)
    # gpu_policy: pause — the worker sleeps and users are told why, at once.
    assert (await runtime.core.client.health())["sleeping"] is True
    _, during = await h.ask(h.user("dave"), "Are you there?")
    assert during["status"] == "error"
    assert h.final_contents(during) == [MSG_RETRAINING]
    runtime.retrainer._proc.kill()  # as if the OOM killer took the trainer
    result = await asyncio.wait_for(retrain, 60)

    assert result.status == "crashed" and "unchanged" in result.message
    assert runtime.registry.promoted() == live
    assert runtime.registry.versions() == versions  # no half-written version appeared
    assert await live_adapter_path(runtime) == live_path
    _, answer = await h.ask(h.user("carol"), "Hello!")
    assert answer["status"] == "complete" and answer["adapter_version"] == live
    assert (await runtime.core.store.last_run())["status"] == "crashed"
    assert not runtime.retrainer.running
    assert (await runtime.core.client.health())["sleeping"] is False


async def test_scheduled_run_rejected_by_the_gate_keeps_the_old_adapter_live(strict_gate):
    h, runtime, ids = strict_gate
    admin_channel = h.new_channel("admins")
    runtime.cfg.discord.admin_channel = admin_channel
    live, live_path = runtime.registry.promoted(), await live_adapter_path(runtime)
    before = await approved_correction(h, runtime, QUESTION, LONG_CORRECTION)
    waiting = await runtime.core.store.count_untrained_approved()
    assert waiting == 2  # this one and the killed run's, which that run did not consume
    runs_before = (await runtime.core.store.last_run())["id"]

    # Too few waiting: the schedule does nothing.
    assert await scheduled_retrain_once(runtime.retrainer, min_corrections=waiting + 1) is None
    assert (await runtime.core.store.last_run())["id"] == runs_before

    runtime.cfg.training.schedule_hours, runtime.cfg.training.schedule_min_corrections = 0.0003, waiting
    schedule = start_schedule(h.bot, runtime)
    try:
        await h.fake.wait_for(lambda: h.fake.messages(admin_channel), timeout=600)
    finally:
        schedule.cancel()
    post = h.fake.messages(admin_channel)[0]
    assert post["embeds"][0]["title"] == "Retrain rejected"
    run = await runtime.core.store.last_run()
    assert run["trigger"] == "schedule" and run["status"] == "rejected"
    assert "did not pass the gate" in run["message"] and not run["report"]["passed"]

    # The gate said no: nothing changed for users.
    assert runtime.registry.promoted() == live
    assert runtime.registry.get(run["version"])["status"] == "rejected"
    assert await live_adapter_path(runtime) == live_path
    _, again = await h.ask(h.user("carol"), QUESTION)
    assert again["answer"] == before["answer"] and again["adapter_version"] == live
    # No dead end: the run names what it did not learn, and its corrections stay waiting, so an
    # admin may retry at once; the schedule waits for a newly approved one instead of re-running.
    assert await runtime.core.store.count_untrained_approved() == waiting
    missed = [i for i in run["report"]["candidate"]["corrections"]["items"] if not i["learned"]]
    status = await runtime.status()
    for item in missed:
        assert f"#{item['id']} " in run["message"] and f"**Not learned in run #{run['id']}:** #{item['id']}" in status
    assert await runtime.retrainer.check_can_start() == waiting
    assert await scheduled_retrain_once(runtime.retrainer, min_corrections=1) is None


# ------------------------------------------------------------------ the terminal


async def test_terminal_mode_runs_the_same_loop(tmp_path, tiny_base, bootstrapped):
    copy_registry(bootstrapped, tmp_path)
    cfg_path = write_plain_config(tmp_path, model_sections(tiny_base, tmp_path))
    script = "\n".join([  # /new: each question is asked afresh, so the answers compare
        QUESTION, "/flag", f"/correct {CORRECTION}", "/corrections", "/approve 1", "/retrain",
        "/new", QUESTION, "/status", "/rollback", "/retract 1", "/new", QUESTION, "/quit",
    ]) + "\n"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--config", str(cfg_path), cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DISCORD_TOKEN": ""})
    stdout, stderr = await asyncio.wait_for(proc.communicate(script.encode()), 900)
    out = stdout.decode()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    name = load_config(cfg_path).identity.name
    answers = [line[len(name) + 2:] for line in out.splitlines() if line.startswith(f"{name}> ")]
    assert len(answers) == 3, out
    assert "Flagged" in out and "Correction #1 saved as pending" in out and "Correction #1 approved" in out
    assert "passed the gate and is now live" in out, out
    assert not answer_matches(answers[0], CORRECTION) and answer_matches(answers[1], CORRECTION), answers
    assert "Live adapter: v0003" in out
    # Retracted, the fact no longer answers: the first version's first answer again.
    assert "Rolled back: v0002 is live again" in out and "Fact #1 retracted" in out and answers[2] == answers[0]
    registry = Registry(tmp_path / "adapters")
    assert registry.promoted() == "v0002" and registry.get("v0003")["stage"] == "calibrate"
