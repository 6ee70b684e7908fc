"""The bot reads its trainer child's JSON lines whatever their length: a final event that lists
many long corrections with the candidate's answers once stopped every retrain (asyncio's
64 KiB line limit) until someone found the correction."""

import json

import pytest

from bot.retrain import run_trainer
from model.config import load_config


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
