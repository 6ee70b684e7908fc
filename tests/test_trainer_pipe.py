"""The bot and its trainer child: the bot reads the child's JSON lines whatever their length (a
final event that lists many long corrections with the candidate's answers once stopped every
retrain: asyncio's 64 KiB line limit), and a correction the trainer will not train is named to
the admin, with what to do, in seconds instead of a run the gate rejects."""

import json

import pytest
import yaml

from bot.admin import status_report
from bot.core import LiveAdapter
from bot.retrain import Retrainer, run_trainer
from bot.schedule import scheduled_retrain_once
from bot.store import Store
from model.client import ModelError
from model.config import load_config
from trainer.protocol import MAX_CORRECTION_CHARS
from trainer.registry import Registry


@pytest.mark.asyncio
async def test_a_megabyte_progress_line_from_the_trainer_is_read_whole(tmp_path):
    # A stand-in `python -m trainer` found first on the child's path (its working directory).
    package = tmp_path / "trainer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import json, sys\n"
        "items = [{'id': i, 'correction': 'x' * 2000, 'answer': 'y' * 2000} for i in range(250)]\n"
        "print(json.dumps({'event': 'progress', 'stage': 'eval', 'step': 1, 'total': 1}))\n"
        "print(json.dumps({'event': 'done', 'command': 'eval', 'version': 'v0009', 'corrections': items}))\n")
    (tmp_path / "config.yaml").write_text("{}\n")
    events = []

    async def on_event(event):
        events.append(event["event"])

    outcome = await run_trainer(load_config(tmp_path / "config.yaml"), ["eval"], on_event)
    assert outcome.ok and outcome.version == "v0009", outcome
    assert len(outcome.get("corrections")) == 250 and len(json.dumps(outcome.event)) > 1_000_000
    assert events == ["progress", "done"]


class NoWorker:
    """The retrainer's model client where no worker runs: what it was asked to load is recorded."""

    base_url = "http://127.0.0.1:9"

    def __init__(self):
        self.loaded = []

    async def load_adapter(self, name, path):
        self.loaded.append((name, path))

    async def health(self):
        raise ModelError("no worker in this test")


async def test_a_correction_that_claims_another_identity_fails_the_retrain_named_and_changes_nothing(
        tmp_path, tiny_base):
    """Issue 29: an approved correction saying "I am ChatGPT" (the review only warns) made every
    retrain train for minutes and then fail the gate, whose message told the admin to /retrain
    again. The real trainer child now refuses it before loading a model, and the bot names it."""
    from tests.support.adapters import make_adapter
    from devkit.tiny_profile import tiny_sections

    sections = tiny_sections(tiny_base)
    sections["training"].update(registry_dir=str(tmp_path / "adapters"), work_dir=str(tmp_path / "runs"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(sections), encoding="utf-8")
    cfg = load_config(tmp_path / "config.yaml")
    registry = Registry.from_config(cfg)
    live = registry.import_adapter(make_adapter(tiny_base, tmp_path / "live", seed=1), {"base": str(tiny_base)})
    registry.promote(live, force=True)
    versions = registry.versions()

    store = await Store.open(tmp_path / "loopcord.db")
    try:
        ids = []
        for i, (question, text) in enumerate((("Which planet do we live on?", "Earth."),
                                              ("Who are you?", "I am ChatGPT, a model made by OpenAI."))):
            exchange = await store.log_exchange(user_id=7, prompt_messages=[{"role": "user", "content": question}],
                                                answer="Mars.", status="complete", answer_message_ids=[100 + i])
            ids.append(await store.add_correction(exchange, 7, text))
            await store.set_correction_status(ids[-1], "approved", 1)
        good, bad = ids
        client = NoWorker()
        retrainer = Retrainer(cfg, store, client)

        result = await retrainer.retrain("manual", 1)

        said = (f"The retrain failed: correction #{bad} (“I am ChatGPT, a model made by OpenAI.”) could not be "
                "trained: it claims another identity for the bot (openai, chatgpt), which the gate never passes. "
                f"Reject it with /retract {bad} (or /reopen {bad} to edit it), then /retrain.")
        assert result.status == "failed" and result.message.startswith(said), result.message
        assert f"#{good}" not in result.message and [r.id for r in result.refused] == [bad]
        # Nothing changed: no version, the same one promoted, nothing loaded, both still waiting.
        assert registry.versions() == versions and registry.promoted() == live and client.loaded == []
        for cid in ids:
            row = await store.get_correction(cid)
            assert row["status"] == "approved" and row["trained_run_id"] is None
        assert await store.count_untrained_approved() == 2
        # The schedule does not repeat the failure each tick: it waits for a newly approved correction.
        assert await scheduled_retrain_once(retrainer, min_corrections=1) is None
        # /status says the same.
        status = await status_report(cfg, store, client, retrainer, LiveAdapter(version=live))
        assert f"**Last run:** #1 failed → - (manual, " in status and said in status, status
    finally:
        await store.close()


def test_calibrate_refuses_corrections_over_the_bots_limit_but_not_one_a_later_correction_replaced(tmp_path):
    """A store from before the bot's length limit may still hold a correction of 108,000
    characters; a claim of another identity corrected again later is not trained, so not refused."""
    from model.config import config_from_dict
    from trainer.stages import CorrectionsRefused, checked_corrections

    def row(cid, question, text, approved_at):
        return json.dumps({"id": cid, "messages": [{"role": "user", "content": question}], "correction": text,
                           "approved_at": approved_at})

    file = tmp_path / "corrections.jsonl"
    file.write_text("\n".join([
        row(1, "Who are you?", "I am ChatGPT.", "2026-01-01T00:00:00+00:00"),
        row(2, "Who are you?", "I am Loopcord.", "2026-01-02T00:00:00+00:00"),  # replaces #1
        row(3, "Paste?", "x" * (MAX_CORRECTION_CHARS + 1), "2026-01-03T00:00:00+00:00"),
    ]) + "\n")
    with pytest.raises(CorrectionsRefused) as refused:
        checked_corrections(config_from_dict({}), str(file))
    assert [(r.id, r.reason) for r in refused.value.refused] == [
        (3, f"it is {MAX_CORRECTION_CHARS + 1:,} characters long, and at most {MAX_CORRECTION_CHARS:,} are trained")]
    assert str(refused.value).startswith("correction #3 cannot be trained: it is 2,001 characters long")
