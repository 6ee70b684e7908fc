"""The seeds' experiment (002) reproduced on a real model: does identity training keep
the model's general ability, and does a correction stick and carry over?

  PYTHONPATH=. python benchmarks/quality_bench.py            # SmolLM2-135M-Instruct, cpu-small
  PYTHONPATH=. python benchmarks/quality_bench.py --fast     # smaller eval slices, for iterating

Trains on the embedded default base (SmolLM2-135M-Instruct, converted from its GGUF),
with the `cpu-small` profile unless --profile says otherwise, through the trainer's own
stages (trainer.stages.run_stage), in a private registry under .loopcord/bench/quality:

  identity-only      anchor on identity data alone (the seeds' anchor; forgetting expected)
  mixed, dataset answers
                     anchor on identity mixed with the profile's general replay (cpu-small: 3:1), answered
                     as the dataset writes it (training.mix.replay_answers: data)
  mixed              the same, the replay answered by the base itself (replay_answers: base,
                     cpu-small's bootstrap: self-distillation against forgetting)
  three-stage        identity-only -> generalize -> calibrate on the corrections
  mixed + calibrate  mixed -> calibrate on the corrections (what /retrain does)

and scores each, with the base beside it, the way seed 002's table does: identity on
held-out paraphrases (en / zh, with and without the system prompt; never another
identity), general QA by kind (knowledge: capitals, facts, translation, opposites;
arithmetic; code) and retention against the base (share of the questions the base
answers right that the adapter still does). Corrections: benchmarks/data/corrections.jsonl,
10 approved corrections (5 facts SmolLM2 gets wrong, 5 a community would teach), each
asked as written and in two hand-written rewordings that training never sees.
Records the table (benchmarks/results/, RESULTS.md) and a chart (benchmarks/quality_bench.png).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.results import preview, record, table  # noqa: E402

CORRECTIONS = ROOT / "benchmarks" / "data" / "corrections.jsonl"
CHART = ROOT / "benchmarks" / "quality_bench.png"
WORK = ROOT / ".loopcord" / "bench" / "quality"
KNOWLEDGE = ("capital", "fact", "translate", "opposite")
# Targets from the issue: identity on held-out paraphrases, retention, corrections.
TARGETS = {"identity_en": 0.95, "identity_zh": 0.80, "retention": 0.95, "corrections": 0.90, "rewordings": 0.60}


class Silent:
    """A trainer.progress.Progress stand-in that prints one line per stage."""

    mode = "none"

    def start(self, stage, total):
        print(f"  {stage}: {total} steps", flush=True)

    def phase(self, phase, message):
        pass

    def step(self, *a):
        pass

    def close(self):
        pass

    def done(self, **kw):
        pass


def bench_config(profile: str, registry: Path, **mix) -> "object":
    from model.config import config_from_dict

    data = {"training": {"registry_dir": str(registry), "work_dir": str(registry.parent / "runs"),
                         "profile": profile}}
    if mix:
        data["profiles"] = {"bench": {**_profile(profile), "mix": {**_profile(profile).get("mix", {}), **mix}}}
        data["training"]["profile"] = "bench"
    return config_from_dict(data, root=ROOT)


def _profile(name: str) -> dict:
    from model.config import default_profiles

    return default_profiles()[name]


def corrections_file(path: Path, cfg) -> tuple[Path, list[dict]]:
    items = [json.loads(line) for line in CORRECTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"id": i, "exchange_id": i, "user_id": 1, "approved_by": 2, "bad_answer": "",
             "messages": [{"role": "system", "content": cfg.identity.system}, {"role": "user", "content": it["question"]}],
             "correction": it["correction"], "created_at": "2026-11-01T10:00:00Z",
             "approved_at": f"2026-11-01T11:{i:02d}:00Z"} for i, it in enumerate(items, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, items


def score(model, tokenizer, cfg, identity_rows, general_rows, items) -> dict:
    """Identity, general QA by kind, and the corrections (as written and reworded)."""
    from trainer import datasets as ds
    from trainer.gate import score_general, score_identity
    from trainer.generate import greedy_answers
    from trainer.matching import normalize

    ident = score_identity(model, tokenizer, cfg, identity_rows)
    general = score_general(model, tokenizer, cfg, general_rows)
    prompts, owners = [], []
    for i, it in enumerate(items):
        for j, q in enumerate([it["question"], *it["rewordings"]]):
            prompts.append(ds.with_system([{"role": "user", "content": q}], cfg.identity.system))
            owners.append((i, j))
    answers = greedy_answers(model, tokenizer, prompts, cfg.eval.max_new_tokens)
    hits = {(i, j): normalize(items[i]["answer"]) in normalize(a) for (i, j), a in zip(owners, answers)}
    as_written = [hits[(i, 0)] for i in range(len(items))]
    reworded = [h for (i, j), h in hits.items() if j > 0]
    by_kind = {}
    for i, it in enumerate(items):
        by_kind.setdefault(it["kind"], []).append(hits[(i, 0)])
    kinds = general["kinds"]
    n_kind = {}
    for row in general_rows:
        n_kind[row.get("kind")] = n_kind.get(row.get("kind"), 0) + 1

    def share(keys):
        total = sum(n_kind.get(k, 0) for k in keys)
        return sum(kinds.get(k, 0) * n_kind.get(k, 0) for k in keys) / total if total else None

    return {
        "identity": ident["accuracy"], "identity_en": ident["groups"].get("lang:en"),
        "identity_zh": ident["groups"].get("lang:zh"), "identity_sys": ident["groups"].get("prompt:system"),
        "identity_nosys": ident["groups"].get("prompt:no_system"), "other_claims": ident["other_identity_claims"],
        "general": general["accuracy"], "knowledge": share(KNOWLEDGE), "arithmetic": share(("arithmetic",)),
        "code": share(("code",)), "general_loss": general["loss"], "right": general["right"],
        "corrections": sum(as_written) / len(as_written), "rewordings": sum(reworded) / len(reworded),
        "corrections_fact": _mean(by_kind.get("fact")), "corrections_community": _mean(by_kind.get("community")),
        "samples": [{"q": prompts[k][-1]["content"], "a": answers[k]} for k in range(0, len(prompts), 3)][:10],
        "identity_failures": ident["failures"][:4],
    }


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu-small")
    ap.add_argument("--fast", action="store_true", help="a third of the general eval set (iterating)")
    ap.add_argument("--skip-three-stage", action="store_true", help="skip generalize (the slowest stage)")
    ap.add_argument("--shipped-only", action="store_true",
                    help="only the profile as shipped: its bootstrap anchor and a calibrate on the corrections "
                         "(no comparison rows); written to the quality_bench_shipped section")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="score in this dtype (training is unchanged); bfloat16 writes its own section, so "
                         "`--registry` of a float32 run scores the same adapters both ways")
    ap.add_argument("--registry", help="resume: reuse the versions an earlier (interrupted) run of this "
                                       "script trained into this registry, in training order")
    args = ap.parse_args()

    import torch
    from peft import PeftModel

    from model.loading import ensure_base, load_model
    from trainer.gate import eval_sets, retention
    from trainer.stages import apply_cpu_threads, run_stage

    WORK.mkdir(parents=True, exist_ok=True)
    registry = Path(args.registry) if args.registry else WORK / f"adapters-{int(time.time())}"
    cfg = bench_config(args.profile, registry)
    apply_cpu_threads(cfg)
    t0 = time.time()
    base_dir = ensure_base(cfg, print)
    print(f"base ready: {base_dir} ({time.time() - t0:.0f} s), threads {torch.get_num_threads()}", flush=True)
    identity_rows, general_rows = eval_sets(cfg)
    if args.fast:
        general_rows = general_rows[::3]
    corr_path, items = corrections_file(WORK / "corrections.jsonl", cfg)

    walls, versions = {}, {}

    from trainer.registry import Registry

    existing = Registry(registry).versions() if registry.exists() else []

    def train(name, stage, cfg_, **kw):
        if len(versions) < len(existing):  # resuming: this one was trained before
            version = existing[len(versions)]
            assert Registry(registry).get(version)["stage"] == stage, (name, version)
            versions[name] = version
            walls[name] = Registry(registry).get(version)["train"]["wall_s"]
            print(f"  {name}: reusing {version} ({walls[name]:.0f} s when trained)", flush=True)
            return version
        started = time.time()
        print(f"training {name} ...", flush=True)
        version, _ = run_stage(cfg_, stage, Silent(), **kw)
        walls[name] = time.time() - started
        versions[name] = version
        print(f"  {name}: {version} in {walls[name]:.0f} s", flush=True)
        return version

    if not args.shipped_only:
        identity_only_cfg = bench_config(args.profile, registry, anchor_general_ratio=0.0)
        train("identity-only", "anchor", identity_only_cfg)
        train("mixed, dataset answers", "anchor", bench_config(args.profile, registry, replay_answers="data"))
    train("mixed", "anchor", cfg)
    train("mixed + calibrate", "calibrate", cfg, corrections_file=str(corr_path), parent=versions["mixed"])
    if not args.skip_three_stage and not args.shipped_only:
        gen_cfg = bench_config(args.profile, registry) if _profile(args.profile)["generalize"]["epochs"] else None
        if gen_cfg is not None:
            train("generalize", "generalize", gen_cfg, parent=versions["identity-only"])
        else:  # cpu-small skips generalize in bootstrap; the experiment runs it with one epoch
            from model.config import config_from_dict

            prof = {**_profile(args.profile), "generalize": {"learning_rate": 2e-4, "epochs": 1.0}}
            gen_cfg = config_from_dict({"training": {"registry_dir": str(registry), "profile": "bench"},
                                        "profiles": {"bench": prof}}, root=ROOT)
            train("generalize", "generalize", gen_cfg, parent=versions["identity-only"])
        train("three-stage", "calibrate", cfg, corrections_file=str(corr_path), parent=versions["generalize"])

    model, tokenizer, _, _ = load_model(base_dir, dtype=args.dtype)
    results = {}
    started = time.time()
    print("scoring base ...", flush=True)
    results["base"] = score(model, tokenizer, cfg, identity_rows, general_rows, items)
    peft = None
    for name, version in versions.items():
        print(f"scoring {name} ...", flush=True)
        path = str(registry / version)
        if peft is None:
            peft = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            peft.load_adapter(path, adapter_name=name)
        peft.set_adapter(name)
        peft.eval()
        results[name] = score(peft, tokenizer, cfg, identity_rows, general_rows, items)
    score_wall = time.time() - started
    for name, r in results.items():
        r["retention"] = retention(r["right"], results["base"]["right"])
    if "mixed + calibrate" in results:
        results["mixed + calibrate"]["retention_vs_parent"] = retention(
            results["mixed + calibrate"]["right"], results["mixed"]["right"])
    if "three-stage" in results:
        results["three-stage"]["retention_vs_parent"] = retention(
            results["three-stage"]["right"], results["generalize"]["right"])

    parts = report(results, walls, score_wall, args, len(general_rows), len(identity_rows))
    if not args.shipped_only and args.dtype == "float32":
        chart(results)
    last = WORK / ("last.json" if args.dtype == "float32" else f"last-{args.dtype}.json")
    last.write_text(json.dumps({"results": results, "walls": walls}, indent=1, default=str))
    section = "quality_bench_shipped" if args.shipped_only else "quality_bench"
    section = section if args.dtype == "float32" else f"{section}_{args.dtype}"
    print(preview(section, **parts))
    record(section, **parts)
    return 0


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def report(results: dict, walls: dict, score_wall: float, args, n_general: int, n_identity: int) -> dict:
    cols = ["identity", "identity_en", "identity_zh", "identity_nosys", "knowledge", "arithmetic", "code",
            "retention", "corrections", "rewordings"]
    head = ["model", "identity", "en", "zh", "no system prompt", "knowledge QA", "arithmetic", "code",
            "retention vs base", "corrections (as asked)", "unseen rewordings", "train wall"]
    rows = []
    for name, r in results.items():
        wall = walls.get(name)
        rows.append([name, *(pct(r.get(c)) for c in cols), "–" if wall is None else f"{wall:.0f} s"])
    notes = ["Other identities claimed (answers naming SmolLM, Hugging Face, Qwen, …): "
             + ", ".join(f"{n} {r['other_claims']}" for n, r in results.items()) + ". "
             f"Scoring all models took {score_wall:.0f} s."]
    for name in ("mixed + calibrate", "three-stage"):
        if name in results:
            r = results[name]
            notes.append(f"- {name}: corrections learned {pct(r['corrections'])} (facts {pct(r['corrections_fact'])}, "
                         f"community {pct(r['corrections_community'])}), unseen rewordings {pct(r['rewordings'])}, "
                         f"retention vs its parent {pct(r.get('retention_vs_parent'))}.")
    notes.append("Targets: " + ", ".join(f"{k} ≥ {pct(v)}" for k, v in TARGETS.items()) + ".")
    return dict(
        text=[f"SmolLM2-135M-Instruct, profile `{args.profile}`, scored in {args.dtype} on CPU; {n_identity} held-out "
              f"identity questions (each with and without the system prompt), {n_general} held-out general questions, "
              "10 corrections × (as asked + 2 unseen rewordings). Command: "
              "`PYTHONPATH=. python benchmarks/quality_bench.py"
              + "".join(f" --{k.replace('_', '-')}" for k in ("fast", "skip_three_stage", "shipped_only")
                        if getattr(args, k))
              + (f" --dtype {args.dtype}" if args.dtype != "float32" else "") + "`. `mixed` is the profile's "
              "bootstrap anchor; `mixed + calibrate` a /retrain of the 10 corrections on it."],
        tables=[table(head, rows)],
        notes=notes,
        images=[] if args.shipped_only else [CHART.name])


def chart(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("identity", "identity"), ("knowledge", "knowledge QA"), ("arithmetic", "arithmetic"),
               ("code", "code"), ("corrections", "corrections"), ("rewordings", "rewordings")]
    names = list(results)
    fig, ax = plt.subplots(figsize=(10, 3.8), dpi=110)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ys = [results[name].get(k) or 0.0 for k, _ in metrics]
        ax.bar([x + i * width for x in range(len(metrics))], ys, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(metrics))], [label for _, label in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share right")
    ax.set_title("SmolLM2-135M-Instruct: identity training, retention and corrections")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(CHART)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
