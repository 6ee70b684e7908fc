"""The trainer's CLI on the tiny base, for the trainer, blend and parallel tests: the tiny
config with a small gate, a `python -m trainer` run, and a corrections file as the bot exports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from devkit.tiny_profile import TINY_PROFILE, tiny_sections
from model.config import config_from_dict

ROOT = Path(__file__).resolve().parent.parent.parent
GENERAL_EVAL_ROWS = 40  # a slice of the held-out general set keeps each gate run to seconds


def tiny_config(tiny_base: Path, workdir: Path, **training) -> dict:
    rows = (ROOT / "data" / "general_eval.jsonl").read_text(encoding="utf-8").splitlines()
    (workdir / "general_eval_small.jsonl").write_text("\n".join(rows[::len(rows) // GENERAL_EVAL_ROWS]) + "\n",
                                                      encoding="utf-8")
    sections = tiny_sections(tiny_base)
    # Two corrections at once (the loop tests teach one): more weight on them, or the tiny
    # model's identity replay can win one of the two (it answered "No." to "Earth." once).
    sections["profiles"]["tiny"] = {**TINY_PROFILE, "calibrate_min_steps": 400,
                                    "mix": {**TINY_PROFILE["mix"], "new_correction_repeats": 48}}
    sections["training"].update({"registry_dir": "adapters", **training})
    sections["eval"].update({"general_data": "general_eval_small.jsonl", "max_new_tokens": 40})
    return sections


def run_trainer(config: Path, *args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer", *args, "--config", str(config)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode not in (0, 3):
        raise AssertionError(f"trainer {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


# Approved corrections exactly as the bot exports them: the prompt it sent (our identity
# system prompt + the question), the answer it gave and the user's correction. The first
# is in no training set (the live adapter cannot know it); the second is a general-set
# question the tiny model answers wrongly on some runs and rightly on others.
CORRECTIONS = [("Which planet do we live on?", "Mars.", "Earth."),
               ("How many hours are in a day?", "22", "24 hours.")]


def corrections_file(path: Path, items=CORRECTIONS) -> Path:
    system = config_from_dict({}).identity.system
    rows = [
        {"id": i, "exchange_id": 10 + i, "user_id": 5, "approved_by": 9, "bad_answer": bad,
         "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
         "correction": good, "created_at": "2025-03-01T10:00:00Z", "approved_at": f"2025-03-01T11:0{i}:00Z"}
        for i, (question, bad, good) in enumerate(items, 1)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
