"""The gate's matcher against people's judgement: does an answer state a correction's fact?

benchmarks/data/matcher_labels.jsonl holds (question, correction, answer, right) rows written
by hand: answers in other words, verbose and short ones, other formats (18:00 for 6 pm), and
near misses (another day, channel or name), partial answers, denials, hedges, real answers of
the base model. The `dev` split (490 rows: 330 written with the matcher, 160 by an annotator
who never saw it) was used to shape the matcher; the `test` split (160 rows by a second
annotator who never saw it or the other rows, never looked at row by row) gives the figures
to quote. Reported: false accepts (a wrong answer counted as learned)
and false rejects (a right answer counted as not learned), for the matcher the gate and the
bot's 📌 line use (key content), the same with the memory's embedding model as a meaning check
beside it (measured, and left out: it changed no verdict), and the token-F1 matcher it replaced.

    python benchmarks/matcher_bench.py            # records benchmarks/results/matcher_bench.json
    python benchmarks/matcher_bench.py --split dev --no-write --show
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.config import load_config  # noqa: E402
from model.embedding import Embedder  # noqa: E402
from trainer.matching import answer_matches, states_fact  # noqa: E402

from benchmarks.results import preview, record, table  # noqa: E402

LABELS = ROOT / "benchmarks" / "data" / "matcher_labels.jsonl"
MEANING_FLOOR = 0.2  # answer-to-fact cosine under which an answer would be "about something else"


def rates(rows: list[dict], verdicts: list[bool]) -> dict:
    wrong = [v for r, v in zip(rows, verdicts) if not r["right"]]
    right = [v for r, v in zip(rows, verdicts) if r["right"]]
    return {"false_accepts": sum(wrong) / len(wrong), "false_rejects": sum(not v for v in right) / len(right),
            "n_wrong": len(wrong), "n_right": len(right)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("dev", "test"), default="test")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--show", action="store_true", help="print the rows the matcher gets wrong")
    args = p.parse_args()
    rows = [json.loads(line) for line in LABELS.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == args.split]
    cfg = load_config(ROOT / "config.yaml")
    embedder = Embedder.load(cfg.memory.embedding_model, cfg.path(cfg.memory.cache_dir))
    answers = embedder.encode([r["answer"] for r in rows])
    facts = embedder.encode([r["correction"] for r in rows])
    sims = (answers * facts).sum(-1).tolist()
    ours = [states_fact(r["answer"], r["correction"], r["question"]) for r in rows]
    with_meaning = [v and s >= MEANING_FLOOR for v, s in zip(ours, sims)]
    before = [answer_matches(r["answer"], r["correction"], question=r["question"]) for r in rows]
    results = {"key content (the gate and the 📌 line)": rates(rows, ours),
               f"key content, and embedding similarity >= {MEANING_FLOOR}": rates(rows, with_meaning),
               "token-F1 matcher it replaced": rates(rows, before)}
    if args.show:
        for r, v, s in zip(rows, ours, sims):  # noqa: B007
            if v != r["right"]:
                print(f"{'FA' if v else 'FR'} sim={s:.2f} | {r['correction']} | {r['answer']} | {r['why']}")
    parts = dict(
        text=[f"{len(rows)} labelled answers ({args.split} split of benchmarks/data/matcher_labels.jsonl"
              + (": 40 facts, 2 right and 2 wrong answers each, written by an annotator who saw neither the "
                 "matcher nor the other labels" if args.split == "test" else "")
              + "); `python benchmarks/matcher_bench.py`"],
        tables=[table(["matcher", "false accepts", "false rejects"],
                      [[name, f"{r['false_accepts']:.1%} of {r['n_wrong']}", f"{r['false_rejects']:.1%} of {r['n_right']}"]
                       for name, r in results.items()])])
    print(preview("matcher_bench", **parts))
    if not args.no_write and args.split == "test":
        record("matcher_bench", **parts)


if __name__ == "__main__":
    main()
