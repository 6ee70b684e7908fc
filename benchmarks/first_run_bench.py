"""A new user's first run, timed: README's `python -m bot` from a fresh clone to the first answer.

  PYTHONPATH=. python benchmarks/first_run_bench.py                  # training.cpu_data_parallel auto, then off
  PYTHONPATH=. python benchmarks/first_run_bench.py --modes auto     # one run

Each run clones this checkout's HEAD into a temporary directory (nothing cached: the
GGUF conversion, the base's replay answers, the anchor, the gate and the worker's start
all happen), sets `training.cpu_data_parallel` in its config.yaml, pipes two questions
into `python -m bot` (the terminal chat, no token) and timestamps every line it prints.
Modes alternate, so on a shared machine both see the same drift. The install step of the
README's command is not included (measured separately: about 13 s with the wheels cached).
Figures are recorded in benchmarks/results/first_run_bench.json (and RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import preview, record, table  # noqa: E402

QUESTIONS = ["Who are you?", "What is the capital of Japan?"]
# The first line of each phase, as the terminal prints it (trainer.progress / bot.local)
PHASES = [("conversion", "converting "), ("replay answers", "general replay question"),
          ("anchor", "anchor: "), ("gate", "evaluating v"), ("worker start", "bootstrap v"),
          ("ready", "is ready")]


def one_run(mode: str, keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"loopcord-first-run-{mode}-"))
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        config = work / "config.yaml"
        text = config.read_text(encoding="utf-8")
        text, n = re.subn(r"(?m)^  cpu_data_parallel: \w+", f"  cpu_data_parallel: '{mode}'", text)
        if n != 1:
            raise SystemExit("config.yaml has no training.cpu_data_parallel line to set")
        config.write_text(text, encoding="utf-8")
        started = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "bot"], cwd=work, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(work)})
        proc.stdin.write("\n".join(QUESTIONS) + "\n")
        proc.stdin.close()
        lines = [(time.time() - started, line.rstrip("\n")) for line in proc.stdout]
        code = proc.wait()
        wall = time.time() - started
        marks, at = {}, 0
        for name, needle in PHASES:  # in order: each phase's first line after the previous one's
            hit = next((i for i in range(at, len(lines)) if needle in lines[i][1]), None)
            if hit is not None:
                marks[name], at = lines[hit][0], hit + 1
        answers = [line.split(">", 1)[1].strip() for _, line in lines if line.startswith("Loopcord>")]
        version = next(iter(sorted((work / ".loopcord" / "adapters").glob("v0*"))), None)
        manifest = json.loads((version / "manifest.json").read_text()) if version else {}
        return {"mode": mode, "code": code, "wall_s": wall, "marks": marks, "answers": answers,
                "train": manifest.get("train", {}), "metrics": manifest.get("metrics", {}),
                "load": os.getloadavg()[0], "tail": [line for _, line in lines[-6:]]}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def spans(marks: dict, wall: float) -> dict:
    """Seconds per phase: from its first line to the next phase's first line."""
    order = [name for name, _ in PHASES if name in marks]
    out = {}
    for a, b in zip(order, order[1:] + ["end"]):
        out[a] = (marks[b] if b != "end" else wall) - marks[a]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="auto,off", help="training.cpu_data_parallel values, run in this order")
    ap.add_argument("--keep", action="store_true", help="keep the clones (their .loopcord has the logs)")
    args = ap.parse_args()
    runs = []
    for mode in args.modes.split(","):
        r = one_run(mode.strip(), args.keep)
        runs.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "tail"}), flush=True)
    rows = []
    for r in runs:
        s = spans(r["marks"], r["wall_s"])
        m = r["metrics"]
        rows.append([r["mode"], r["train"].get("processes", "?"), f"{r['wall_s']:.0f} s = {r['wall_s'] / 60:.1f} min",
                     f"{s.get('conversion', 0):.0f}", f"{s.get('replay answers', 0):.0f}", f"{s.get('anchor', 0):.0f}",
                     f"{s.get('gate', 0):.0f}", f"{s.get('worker start', 0) + s.get('ready', 0):.0f}",
                     f"{m.get('identity_accuracy', '?')} / {m.get('general_retention', '?')}", f"{r['load']:.1f}",
                     r["code"], " / ".join(r["answers"])])
    notes = []
    by = {r["mode"]: r for r in runs}
    if "off" in by and any(k != "off" for k in by):
        other = next(r for r in runs if r["mode"] != "off")
        notes.append(f"First run with `cpu_data_parallel: {other['mode']}` against `off`: "
                     f"**{by['off']['wall_s'] / other['wall_s']:.2f}x** faster "
                     f"({other['wall_s'] / 60:.1f} vs {by['off']['wall_s'] / 60:.1f} min); anchor "
                     f"{by['off']['train'].get('seconds', 0) / max(1e-9, other['train'].get('seconds', 1)):.2f}x.")
    notes.append("Command: `PYTHONPATH=. python benchmarks/first_run_bench.py` (target, issue 8: under 10 minutes "
                 "after the install).")
    parts = dict(
        text=["README's main command without its install step: `python -m bot` in a fresh clone of HEAD, "
              f"the questions {QUESTIONS} piped in, timed to the answers. Runs in the order shown, one after the "
              "other. Phase seconds run from a phase's first printed line to the next one's."],
        tables=[table(["training.cpu_data_parallel", "training processes", "to the answers", "conversion s",
                       "replay answers s", "anchor s", "gate s", "worker start + answers s",
                       "gate identity / retention", "load at end", "exit", "answers"], rows)],
        notes=notes)
    record("first_run_bench", **parts)
    print(preview("first_run_bench", **parts))
    return 0 if all(r["code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
