"""The evaluation gate: score a candidate adapter against its reference and decide.

Scores (all zh + en):
- identity: held-out identity paraphrases, asked with our system prompt and with
  none; an answer passes when it names `identity.name` or `identity.author` and
  no other model/maker (trainer.matching.identity_ok).
- corrections: each correction the version learned from (its manifest, or
  --corrections FILE) asked as the original exchange and as the identity-
  prefixed rewording; learned when both answers match the correction
  (trainer.matching.answer_matches: normalised containment or token F1 >= 0.6).
  Calibrate trains on both forms (trainer.corrections.correction_samples), so
  this checks the answer sticks under our system prompt in two phrasings, not
  that it generalises to unseen rewordings (a 1M-parameter demo base cannot).
- general retention: assistant-token loss on the held-out general set and
  contains-accuracy on its QA (row `answer`, else the reference reply), with
  our system prompt and with none, versus the reference model.

The reference is the parent if it has been promoted (the adapter it would
replace), else its nearest promoted ancestor, else the base model — so a
generalize run is not judged against an unpromoted anchor.

Pass when identity >= eval.min_identity_accuracy, corrections learned >=
eval.min_corrections_learned (when there are any), general loss <= reference
* (1 + eval.max_general_loss_increase) and general accuracy >= reference -
eval.max_general_accuracy_drop. The CLI exits 0 on pass, 3 on fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from model.config import Config
from trainer import datasets as ds
from trainer.corrections import deduplicate, load_corrections, prefixed_question
from trainer.matching import DEFAULT_FORBIDDEN_IDENTITIES, answer_matches, identity_ok
from trainer.registry import Registry, write_json_atomic

REPORT_FILE = "eval.json"
CHART_FILE = "eval.png"
EXIT_PASSED, EXIT_FAILED = 0, 3
# Failing answers kept in the report, per check, for a human to read.
MAX_EXAMPLES = 8


def reference_version(reg: Registry, version: str) -> Optional[str]:
    """Nearest promoted ancestor of `version` (None: the base model)."""
    seen, parent = set(), reg.get(version).get("parent")
    while parent and parent not in seen:
        seen.add(parent)
        m = reg.get(parent)
        if m.get("promoted_at") or m.get("status") in ("promoted", "rolled_back"):
            return parent
        parent = m.get("parent")
    return None


def eval_sets(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(identity eval rows with placeholders filled, general eval rows) as raw dicts."""
    def load(configured, shipped):
        path = cfg.path(configured) if configured else ds.DATA_DIR / shipped
        return [(f"{path}:{line}", row) for line, row in ds.read_jsonl_rows(Path(path))]

    identity = []
    for where, row in load(cfg.eval.identity_data, ds.IDENTITY_EVAL_FILE):
        msgs = ds.fill_identity(ds.row_to_messages(row, where), cfg.identity.fill)
        identity.append({**row, "messages": msgs})
    general = []
    for where, row in load(cfg.eval.general_data, ds.GENERAL_EVAL_FILE):
        msgs = ds.row_to_messages(row, where)
        general.append({**row, "messages": msgs, "answer": row.get("answer") or msgs[-1]["content"]})
    return identity, general


def correction_cases(cfg: Config, manifest: dict, corrections_file: Optional[str]) -> list[dict]:
    if corrections_file:
        items = [{"id": c.id, "messages": c.messages, "correction": c.correction}
                 for c in deduplicate(load_corrections(corrections_file))]
    else:
        items = manifest.get("corrections") or []
    return items


def prompt_variants(question_msgs: list[dict], system: str) -> list[tuple[str, list[dict]]]:
    return [("system", ds.with_system(question_msgs, system)), ("no_system", ds.with_system(question_msgs, None))]


def score_model(model, tokenizer, cfg: Config, identity_rows, general_rows, cases) -> dict:
    from trainer.generate import greedy_answers, mean_answer_loss

    system, max_new = cfg.identity.system, cfg.eval.max_new_tokens
    forbidden = cfg.eval.forbidden_identities or DEFAULT_FORBIDDEN_IDENTITIES

    # identity
    prompts, meta = [], []
    for row in identity_rows:
        for variant, msgs in prompt_variants(row["messages"][:-1], system):
            prompts.append(msgs)
            meta.append((row, variant))
    answers = greedy_answers(model, tokenizer, prompts, max_new)
    id_ok = [identity_ok(a, cfg.identity.name, cfg.identity.author, forbidden) for a in answers]
    by_group: dict[str, list[bool]] = {}
    for (row, variant), ok in zip(meta, id_ok):
        for key in (f"lang:{row.get('lang', '?')}", f"prompt:{variant}"):
            by_group.setdefault(key, []).append(ok)
    identity = {
        "accuracy": _mean(id_ok),
        "n": len(id_ok),
        "groups": {k: _mean(v) for k, v in sorted(by_group.items())},
        "failures": [{"question": m[0]["messages"][-2]["content"], "prompt": m[1], "answer": a}
                     for m, a, ok in zip(meta, answers, id_ok) if not ok][:MAX_EXAMPLES],
    }

    # corrections: the original exchange (our system prompt) and the identity-prefixed rewording
    corr_prompts = []
    for c in cases:
        question = c["messages"][-1]["content"]
        corr_prompts.append(ds.with_system(c["messages"], system))
        corr_prompts.append(ds.with_system([{"role": "user", "content": prefixed_question(question, cfg.identity.fill)}],
                                           system))
    corr_answers = greedy_answers(model, tokenizer, corr_prompts, max_new) if cases else []
    per = []
    for i, c in enumerate(cases):
        a_orig, a_para = corr_answers[2 * i], corr_answers[2 * i + 1]
        learned = answer_matches(a_orig, c["correction"]) and answer_matches(a_para, c["correction"])
        per.append({"id": c["id"], "question": c["messages"][-1]["content"], "correction": c["correction"],
                    "answer": a_orig, "paraphrase_answer": a_para, "learned": learned})
    corrections = {"learned": _mean([p["learned"] for p in per]) if per else None, "n": len(per), "items": per}

    # general retention
    g_prompts, g_samples, g_refs = [], [], []
    for row in general_rows:
        for _, msgs in prompt_variants(row["messages"], system):
            g_samples.append(msgs)
            g_prompts.append(msgs[:-1])
            g_refs.append(row["answer"])
    g_answers = greedy_answers(model, tokenizer, g_prompts, min(max_new, cfg.eval.general_max_new_tokens))
    g_ok = [answer_matches(a, ref, min_f1=1.01) for a, ref in zip(g_answers, g_refs)]  # containment only
    general = {
        "loss": round(mean_answer_loss(model, tokenizer, g_samples, cfg.training.max_length), 5),
        "accuracy": _mean(g_ok),
        "n": len(g_ok),
    }
    return {"identity": identity, "corrections": corrections, "general": general}


def _mean(xs) -> float:
    xs = list(xs)
    return round(sum(1.0 for x in xs if x) / len(xs), 4) if xs else 0.0


def decide(cfg: Config, cand: dict, ref: dict) -> tuple[bool, list[dict]]:
    """Apply the thresholds; returns (passed, checks)."""
    e = cfg.eval
    checks = [
        _check("identity_accuracy", cand["identity"]["accuracy"], ">=", e.min_identity_accuracy),
        _check("general_loss", cand["general"]["loss"], "<=",
               round(ref["general"]["loss"] * (1 + e.max_general_loss_increase), 5)),
        _check("general_accuracy", cand["general"]["accuracy"], ">=",
               round(ref["general"]["accuracy"] - e.max_general_accuracy_drop, 4)),
    ]
    if cand["corrections"]["n"]:
        checks.append(_check("corrections_learned", cand["corrections"]["learned"], ">=", e.min_corrections_learned))
    return all(c["passed"] for c in checks), checks


def _check(name: str, value: float, op: str, limit: float) -> dict:
    passed = value >= limit if op == ">=" else value <= limit
    return {"name": name, "value": value, "op": op, "limit": limit, "passed": passed}


def evaluate(cfg: Config, version: str, corrections_file: Optional[str] = None, log=None) -> dict:
    """Score `version` and its reference, write eval.json + eval.png, record in the manifest."""
    from peft import PeftModel

    from trainer import sft

    reg = Registry(cfg.path(cfg.training.registry_dir))
    manifest = reg.get(version)
    ref_version = reference_version(reg, version)
    identity_rows, general_rows = eval_sets(cfg)
    cases = correction_cases(cfg, manifest, corrections_file)

    base, tokenizer = sft.load_base(manifest["base"])
    model = PeftModel.from_pretrained(base, str(reg.path(version)), adapter_name="candidate")
    model.eval()
    if log:
        log(f"eval {version}: {len(identity_rows)} identity, {len(general_rows)} general, {len(cases)} corrections")
    cand = score_model(model, tokenizer, cfg, identity_rows, general_rows, cases)
    if ref_version:
        model.load_adapter(str(reg.path(ref_version)), adapter_name="reference")
        model.set_adapter("reference")
        ref = score_model(model, tokenizer, cfg, identity_rows, general_rows, cases)
    else:
        with model.disable_adapter():
            ref = score_model(model, tokenizer, cfg, identity_rows, general_rows, cases)
    passed, checks = decide(cfg, cand, ref)
    report = {
        "version": version,
        "reference": ref_version or "base",
        "passed": passed,
        "checks": checks,
        "candidate": cand,
        "reference_scores": ref,
        "thresholds": {k: getattr(cfg.eval, k) for k in (
            "min_identity_accuracy", "min_corrections_learned", "max_general_loss_increase",
            "max_general_accuracy_drop")},
    }
    write_json_atomic(reg.path(version) / REPORT_FILE, report)
    summary = {
        "identity_accuracy": cand["identity"]["accuracy"],
        "corrections_learned": cand["corrections"]["learned"],
        "general_loss": cand["general"]["loss"],
        "general_accuracy": cand["general"]["accuracy"],
        "reference": ref_version or "base",
        "reference_identity_accuracy": ref["identity"]["accuracy"],
        "reference_general_loss": ref["general"]["loss"],
        "reference_general_accuracy": ref["general"]["accuracy"],
    }
    status = manifest.get("status")
    if status == "candidate" and not passed:
        status = "rejected"
    elif status == "rejected" and passed:
        status = "candidate"
    reg.update(version, metrics=summary, gate={"passed": passed, "report": REPORT_FILE,
                                               "failed": [c["name"] for c in checks if not c["passed"]]},
               status=status)
    write_chart(reg, reg.path(version) / CHART_FILE)
    return report


def write_chart(reg: Registry, out: Path) -> None:
    """Scores of every evaluated version (identity, corrections, general accuracy; general loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(v, reg.get(v).get("metrics") or {}) for v in reg.versions()]
    rows = [(v, m) for v, m in rows if m]
    fig, ax = plt.subplots(figsize=(max(5, 1 + 0.7 * len(rows)), 3.6), dpi=110)
    xs = list(range(len(rows)))
    for key, label in (("identity_accuracy", "identity"), ("corrections_learned", "corrections learned"),
                       ("general_accuracy", "general accuracy")):
        ys = [m.get(key) if m.get(key) is not None else float("nan") for _, m in rows]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("score")
    ax.set_xticks(xs, [v for v, _ in rows])
    ax2 = ax.twinx()
    ax2.plot(xs, [m.get("general_loss", float("nan")) for _, m in rows], "k--", marker="x", label="general loss")
    ax2.set_ylabel("general loss")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    ax.set_title("loopcord adapter evaluations")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


def report_json(report: dict) -> str:
    return json.dumps(report, ensure_ascii=False, indent=2)
