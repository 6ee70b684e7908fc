"""The test suite's shape: wall time of the fast tier and of the whole suite (what CI runs).

  PYTHONPATH=. python benchmarks/suite_bench.py            # fast tier only (-m "not slow")
  PYTHONPATH=. python benchmarks/suite_bench.py --full     # and the whole suite, slow tests included
  PYTHONPATH=. python benchmarks/suite_bench.py --full-from-log ci.log   # the whole suite from a CI run's output

Each run is `python -m pytest -q` in this checkout with HF_HUB_OFFLINE=1; the figures
(passed / failed / skipped and wall seconds, from pytest's own summary line) are recorded
in benchmarks/results/suite_bench.json (and RESULTS.md). The first run on a machine also builds and
caches the tiny test model; a run that had to build it says so.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import record, table  # noqa: E402

SUMMARY = re.compile(r"^=*\s*(.*?(passed|failed|error).*?) in ([\d.]+)s", re.M)


def run(args: list[str]) -> dict:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - started
    out = proc.stdout + proc.stderr
    match = SUMMARY.findall(out)
    summary = match[-1][0] if match else f"no summary (exit {proc.returncode})"
    return {"args": " ".join(args) or "(all)", "summary": summary, "wall_s": wall, "code": proc.returncode,
            "built_base": "building the tiny test model" in out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also run the whole suite (slow tests included)")
    ap.add_argument("--full-from-log", metavar="FILE",
                    help="take the whole suite's figures from the output of a run already made (e.g. "
                         "`bash .ci/run > ci.log 2>&1` on a clean clone) instead of running it again")
    args = ap.parse_args()
    runs = [run(["-m", "not slow"])]
    if args.full:
        runs.append(run([]))
    elif args.full_from_log:
        out = Path(args.full_from_log).read_text(encoding="utf-8", errors="replace")
        match = SUMMARY.findall(out)
        if not match:
            ap.error(f"{args.full_from_log}: no pytest summary line in it")
        runs.append({"args": "(all, from " + Path(args.full_from_log).name + ")", "summary": match[-1][0],
                     "wall_s": float(match[-1][2]), "code": 0 if "failed" not in match[-1][0] else 1,
                     "built_base": "building the tiny test model" in out})
    rows = []
    for r in runs:
        note = " (built the tiny test model first)" if r["built_base"] else ""
        rows.append([f"`pytest -q {r['args']}`", f"{r['summary']}{note}", f"{r['wall_s'] / 60:.1f} min"])
        print(" | ".join(rows[-1]), flush=True)
    record("suite_bench", tables=[table(["tier", "result", "wall"], rows)],
           notes=["CI runs the whole suite (`bash .ci/run`: install, then `pytest -q`)."])
    return 0 if all(r["code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
