"""Choose the CPU recipe by measurement: train anchor (or calibrate) variants of a profile on
SmolLM2 and score each against the base on the whole held-out sets.

  PYTHONPATH=. python benchmarks/recipe_sweep.py anchor NAME '{"mix": {"anchor_general_ratio": 2.0}}'
  PYTHONPATH=. python benchmarks/recipe_sweep.py calibrate NAME ANCHOR_NAME '{"calibrate": {"epochs": 2.0}}'
  PYTHONPATH=. python benchmarks/recipe_sweep.py report [SECTION]

A variant is the `cpu-small` profile with the JSON merged over it (any training.* key).
`anchor` trains the bootstrap's anchor stage and scores it: identity (held-out paraphrases,
en / zh, with and without the system prompt) and retention (share of the 212 held-out
general questions the base answers right that the variant still does), plus the answer loss
the gate checks. `calibrate` continues an anchor variant (with its settings) on the 10 bench
corrections (benchmarks/data/corrections.jsonl) and scores them as asked and in their
unseen rewordings, and retention against that anchor. Results are appended to
.loopcord/bench/recipe/results.jsonl; `report` records them (benchmarks/results/recipe_sweep.json, RESULTS.md).
Run two variants at a time on a 2-core machine (each trains on one thread); the train times
then include that contention.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.results import preview, record, table  # noqa: E402

WORK = ROOT / ".loopcord" / "bench" / "recipe"
RESULTS = WORK / "results.jsonl"
CORRECTIONS = ROOT / "benchmarks" / "data" / "corrections.jsonl"


def variant_config(registry: Path, overrides: dict):
    from model.config import config_from_dict, deep_merge, default_profiles

    profile = deep_merge(default_profiles()["cpu-small"], overrides)
    return config_from_dict({"training": {"registry_dir": str(registry), "work_dir": str(registry / "runs"),
                                          "profile": "variant"},
                             "profiles": {"variant": profile}}, root=ROOT)


def base_scores(cfg, model, tokenizer, identity_rows, general_rows, items) -> dict:
    from benchmarks.quality_bench import score

    path = WORK / "base_scores.json"
    if path.exists():
        return json.loads(path.read_text())
    scores = score(model, tokenizer, cfg, identity_rows, general_rows, items)
    path.write_text(json.dumps(scores))
    return scores


def run(kind: str, name: str, overrides: dict, anchor: str | None = None) -> dict:
    from peft import PeftModel

    from benchmarks.quality_bench import Silent, corrections_file, score
    from model.config import deep_merge
    from model.loading import ensure_base, load_model
    from trainer.gate import eval_sets, retention
    from trainer.registry import Registry
    from trainer.stages import apply_cpu_threads, run_stage

    WORK.mkdir(parents=True, exist_ok=True)
    registry = WORK / name
    parent_scores = None
    if kind == "calibrate":
        source = WORK / anchor
        overrides = deep_merge(json.loads((source / "variant.json").read_text()), overrides)
        parent_scores = json.loads((source / "scores.json").read_text())
        shutil.rmtree(registry, ignore_errors=True)
        shutil.copytree(source, registry)
    else:
        shutil.rmtree(registry, ignore_errors=True)
        registry.mkdir(parents=True)
        shared = WORK / ".base-replay"  # the base's replay answers, shared by every variant
        shared.mkdir(exist_ok=True)
        (registry / ".base-replay").symlink_to(shared, target_is_directory=True)
    cfg = variant_config(registry, overrides)
    apply_cpu_threads(cfg)
    base_dir = ensure_base(cfg, print)
    corr_path, items = corrections_file(registry / "corrections.jsonl", cfg)
    started = time.time()
    if kind == "calibrate":
        parent = Registry(registry).versions()[0]
        version, _ = run_stage(cfg, "calibrate", Silent(), corrections_file=str(corr_path), parent=parent)
    else:
        version, _ = run_stage(cfg, "anchor", Silent())
    wall = time.time() - started
    identity_rows, general_rows = eval_sets(cfg)
    model, tokenizer, _, _ = load_model(base_dir)
    base = base_scores(cfg, model, tokenizer, identity_rows, general_rows, items)
    peft = PeftModel.from_pretrained(model, str(registry / version))
    peft.eval()
    r = score(peft, tokenizer, cfg, identity_rows, general_rows, items)
    manifest = Registry(registry).get(version)
    result = {
        "kind": kind, "name": name, "anchor": anchor, "overrides": overrides,
        "steps": manifest["train"]["steps"], "train_s": round(wall),
        "identity": r["identity"], "identity_en": r["identity_en"], "identity_zh": r["identity_zh"],
        "other_claims": r["other_claims"], "retention": retention(r["right"], base["right"]),
        "retention_vs_parent": retention(r["right"], parent_scores["right"]) if parent_scores else None,
        "general_loss": r["general_loss"], "base_general_loss": base["general_loss"],
        "corrections": r["corrections"] if kind == "calibrate" else None,
        "rewordings": r["rewordings"] if kind == "calibrate" else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (registry / "scores.json").write_text(json.dumps(r))
    (registry / "variant.json").write_text(json.dumps(overrides))
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(result) + "\n")
    print("RESULT", json.dumps(result), flush=True)
    return result


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"  # one decimal: 94.7% must not read as 95%


def report() -> dict:
    rows = [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for r in rows:
        what = json.dumps(r["overrides"], separators=(",", ":")) if r["overrides"] else "as shipped"
        run_name = r["name"] + (f" (on {r['anchor']})" if r.get("anchor") else "")
        out.append([run_name, f"`{what}`", r["steps"], f"{r['train_s']} s", pct(r["identity"]), pct(r["identity_en"]),
                    pct(r["identity_zh"]), pct(r["retention"]), pct(r.get("retention_vs_parent")),
                    pct(r.get("corrections")), pct(r.get("rewordings")),
                    f"{r['general_loss']:.2f} ({r['base_general_loss']:.2f})"])
    return dict(
        text=["SmolLM2-135M-Instruct, float32 on CPU, one thread per run, two runs at a time on the shared 2-core "
              "machine (train wall includes that contention); the 212 held-out general questions and 31 identity "
              "questions (with and without the system prompt). A variant is `cpu-small` as it was when the sweep "
              "ran, with the overrides shown. Command: `PYTHONPATH=. python benchmarks/recipe_sweep.py "
              "anchor|calibrate NAME ...`, then `report`."],
        tables=[table(["run", "variant (over cpu-small)", "steps", "train wall", "identity", "en", "zh",
                       "retention vs base", "vs parent", "corrections", "unseen rewordings", "answer loss (base)"],
                      out)])


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["report"]:  # report [SECTION]: another section keeps an earlier sweep's table
        name, parts = args[1] if len(args) > 1 else "recipe_sweep", report()
        print(preview(name, **parts))
        record(name, **parts)
        return 0
    if len(args) >= 2 and args[0] == "anchor":
        run("anchor", args[1], json.loads(args[2]) if len(args) > 2 else {})
        return 0
    if len(args) >= 3 and args[0] == "calibrate":
        run("calibrate", args[1], json.loads(args[3]) if len(args) > 3 else {}, anchor=args[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
