"""The evaluation gate: score a candidate adapter against its reference and decide.

Scores (zh + en):
- identity: held-out identity paraphrases, asked with our system prompt and with
  none (the base's template then injects its own identity, e.g. SmolLM's); an
  answer passes when it names `identity.name` or `identity.author` and claims no
  other model or maker (trainer.matching.identity_ok).
- corrections: each correction of the run asked as a fresh question (how members ask
  again; this decides "learned"), in its original conversation, and as a fresh question
  with the fact in the prompt as the bot's memory quotes it (reported: the gate judges the
  weights, the memory off). An answer counts when it states the fact as a person would judge
  it: its key content (names, numbers, times, days, channels), undenied, in any words
  (trainer.matching.states_fact; false accepts and rejects on labelled answers:
  benchmarks/matcher_bench.py). Carry-over: the same question in held-out rule-based
  rewordings (trainer.corrections.gate_rewordings) that calibrate never trains on. A
  correction that itself claims another identity ("I am ChatGPT") is never counted as
  learned, and fails the gate.
- general retention: answers on the held-out general QA set (row `answer`: a
  string a right reply contains), asked under our system prompt; retention = share
  of the questions the reference answers right that the candidate still does.
  Plus assistant-token loss on the same set under our system prompt (general data is
  trained under it, and the bot always sends it; identity is the one thing checked
  without it too).

The reference is the parent if it has been promoted (the adapter it would
replace), else its nearest promoted ancestor, else the base model — so a
generalize run is not judged against an unpromoted anchor. A version's scores
are stored next to it (scores.json, keyed by what was asked), so the reference's
scores are computed once, not at every retrain.

Pass when identity >= eval.min_identity_accuracy, at least one of the run's corrections learned
(or the share eval.min_corrections_learned, when set), no correction claims another
identity, general retention >= eval.min_general_retention (when the reference answers at
least eval.min_retention_questions held-out questions right) and general loss <=
reference * (1 + eval.max_general_loss_increase). Every threshold is a share
above zero (config validation), so none of these checks can pass by default.
The CLI exits 0 on pass, 3 on fail (trainer.protocol.ExitCode).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
from pathlib import Path
from typing import Callable, Optional

from bot.context import with_facts
from model.config import Config
from trainer import datasets as ds
from trainer import sft
from trainer.corrections import deduplicate, gate_rewordings, load_corrections
from trainer.cores import child_setup, spare_cores, start_child
from trainer.generate import greedy_answers, mean_answer_loss
from trainer.matching import answer_matches, forbidden_identities, identity_claims, identity_ok, states_fact
from trainer.progress import log as log_line
from trainer.protocol import CHART_FILE, EVER_LIVE, REPORT_FILE, VersionStatus
from trainer.registry import Registry, read_json_cache, write_json_atomic

SCORES_FILE = "scores.json"  # a version's (or the base's) scores, keyed by the eval fingerprint
BASE_SCORES_DIR = ".base-scores"  # inside the registry: the base model's scores per fingerprint
# Failing answers kept in the report, per check, for a human to read.
MAX_EXAMPLES = 8


def reference_version(reg: Registry, version: str) -> Optional[str]:
    """Nearest promoted ancestor of `version` (None: the base model)."""
    seen, parent = set(), reg.get(version).get("parent")
    while parent and parent not in seen:
        seen.add(parent)
        m = reg.get(parent)
        if m.get("promoted_at") or m.get("status") in EVER_LIVE:
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


def score_identity(model, tokenizer, cfg: Config, identity_rows) -> dict:
    prompts, meta = [], []
    for row in identity_rows:
        for variant, msgs in prompt_variants(row["messages"][:-1], cfg.identity.system):
            prompts.append(msgs)
            meta.append((row, variant))
    answers = greedy_answers(model, tokenizer, prompts, cfg.eval.max_new_tokens)
    ok = [identity_ok(a, cfg.identity.name, cfg.identity.author, forbidden_identities(cfg)) for a in answers]
    by_group: dict[str, list[bool]] = {}
    for (row, variant), good in zip(meta, ok):
        for key in (f"lang:{row.get('lang', '?')}", f"prompt:{variant}"):
            by_group.setdefault(key, []).append(good)
    return {
        "accuracy": _mean(ok),
        "n": len(ok),
        "groups": {k: _mean(v) for k, v in sorted(by_group.items())},
        "other_identity_claims": sum(1 for a in answers
                                     if identity_claims(a, cfg.identity.name, cfg.identity.author,
                                                        forbidden_identities(cfg))),
        "failures": [{"question": m[0]["messages"][-2]["content"], "prompt": m[1], "answer": a}
                     for m, a, good in zip(meta, answers, ok) if not good][:MAX_EXAMPLES],
    }


def score_corrections(model, tokenizer, cfg: Config, cases) -> dict:
    """Each correction asked as a fresh question (how members ask again: this decides
    "learned"), in its original conversation, in held-out rewordings, and as a fresh question
    with the fact in the prompt as the bot's memory puts it (reported, not gated: the gate
    judges the weights). An answer counts when it states the fact (trainer.matching.states_fact)."""
    if not cases:
        return {"learned": None, "carried_over": None, "in_context": None, "with_memory": None, "n": 0, "items": []}
    system = cfg.identity.system
    prompts, spans = [], []
    for c in cases:
        question = c["messages"][-1]["content"]
        rewordings = gate_rewordings(question)
        spans.append((len(prompts), len(rewordings)))
        fresh = [{"role": "user", "content": question}]
        prompts.append(ds.with_system(fresh, system))
        prompts.append(ds.with_system(c["messages"], system))
        prompts.append(ds.with_system(fresh, with_facts(system, [(question, c["correction"])])))
        prompts += [ds.with_system([{"role": "user", "content": q}], system) for q in rewordings]
    answers = greedy_answers(model, tokenizer, prompts, cfg.eval.max_new_tokens)

    def states(i: int, c: dict) -> bool:
        return states_fact(answers[i], c["correction"], c["messages"][-1]["content"])

    items = []
    for c, (start, n) in zip(cases, spans):
        claims = identity_claims(c["correction"], cfg.identity.name, cfg.identity.author, forbidden_identities(cfg))
        reworded = [{"question": prompts[i][-1]["content"], "answer": answers[i], "matches": states(i, c)}
                    for i in range(start + 3, start + 3 + n)]
        items.append({
            "id": c["id"], "question": c["messages"][-1]["content"], "correction": c["correction"],
            "answer": answers[start],
            "learned": not claims and states(start, c),
            "in_context_answer": answers[start + 1],
            "in_context": states(start + 1, c),
            "with_memory_answer": answers[start + 2],
            "with_memory": states(start + 2, c),
            "carried_over": _mean(r["matches"] for r in reworded) if reworded else None,
            "rewordings": reworded,
            "claims_identity": claims,
        })
    return {
        "learned": _mean(i["learned"] for i in items),
        "in_context": _mean(i["in_context"] for i in items),
        "with_memory": _mean(i["with_memory"] for i in items),
        "carried_over": _mean(r["matches"] for i in items for r in i["rewordings"]),
        "n": len(items),
        "items": items,
    }


def general_prompts(cfg: Config, general_rows) -> list:
    return [ds.with_system(row["messages"][:-1], cfg.identity.system) for row in general_rows]


def general_answers(model, tokenizer, cfg: Config, general_rows) -> list[str]:
    return greedy_answers(model, tokenizer, general_prompts(cfg, general_rows),
                          min(cfg.eval.max_new_tokens, cfg.eval.general_max_new_tokens))


def score_general(model, tokenizer, cfg: Config, general_rows,
                  answers: Optional[Callable[[], Optional[list[str]]]] = None,
                  meanwhile: Optional[Callable[[], None]] = None) -> dict:
    """Answers and answer loss on the held-out general set. `answers()`, when given, hands
    over the answers computed elsewhere (None: generate them here); it is called last,
    after the loss and `meanwhile()`, so that work overlaps with theirs."""
    system = cfg.identity.system
    samples = [ds.with_system(row["messages"], system) for row in general_rows]
    loss = round(mean_answer_loss(model, tokenizer, samples, cfg.training.max_length), 5)
    if meanwhile:
        meanwhile()
    given = answers() if answers else None
    given = given if given is not None else general_answers(model, tokenizer, cfg, general_rows)
    right = [answer_matches(a, row["answer"], min_f1=1.01) for a, row in zip(given, general_rows)]  # containment
    by_kind: dict[str, list[bool]] = {}
    for row, good in zip(general_rows, right):
        by_kind.setdefault(str(row.get("kind", "?")), []).append(good)
    return {
        "loss": loss,
        "accuracy": _mean(right),
        "right": right,  # per question, for retention against another version's scores
        "kinds": {k: _mean(v) for k, v in sorted(by_kind.items())},
        "n": len(right),
    }


def score_model(model, tokenizer, cfg: Config, identity_rows, general_rows, cases,
                general: Optional[Callable[[], Optional[list[str]]]] = None,
                meanwhile: Optional[Callable[[], None]] = None) -> dict:
    """`general` and `meanwhile` as in score_general: the identity and correction questions,
    the loss and `meanwhile()` all run before the general answers computed elsewhere are
    collected."""
    identity = score_identity(model, tokenizer, cfg, identity_rows)
    corrections = score_corrections(model, tokenizer, cfg, cases)
    return {
        "identity": identity,
        "corrections": corrections,
        "general": score_general(model, tokenizer, cfg, general_rows, general, meanwhile),
    }


def retention(cand_right: list[bool], ref_right: list[bool]) -> Optional[float]:
    """Share of the questions the reference answers right that the candidate still does
    (None when the reference answers none: there is nothing to retain)."""
    kept = [c for c, r in zip(cand_right, ref_right) if r]
    return _mean(kept) if kept else None


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
    ]
    # gated on enough questions the reference knows (at least 1, config validation: so never None here)
    if sum(ref["general"]["right"]) >= e.min_retention_questions:
        kept = retention(cand["general"]["right"], ref["general"]["right"])
        checks.append(_check("general_retention", kept, ">=", e.min_general_retention))
    items = cand["corrections"]["items"]
    if items:
        # A version that learned some of its corrections and lost nothing (the checks above) knows
        # more than its parent: it goes live, and what it did not learn stays waiting (answered by the
        # memory; the next /retrain tries again). One that learned none changes nothing worth a swap.
        needed = e.min_corrections_learned if e.min_corrections_learned is not None else 1 / len(items)
        checks.append(_check("corrections_learned", cand["corrections"]["learned"], ">=", round(needed, 4)))
        claiming = sum(1 for i in items if i["claims_identity"])
        checks.append(_check("corrections_claiming_other_identity", claiming, "<=", 0))
    return all(c["passed"] for c in checks), checks


def _check(name: str, value: float, op: str, limit: float) -> dict:
    passed = value >= limit if op == ">=" else value <= limit
    return {"name": name, "value": value, "op": op, "limit": limit, "passed": passed}


def fingerprint(cfg: Config, identity_rows, general_rows, cases) -> str:
    """What a version's scores depend on besides its weights: the questions and how they are asked."""
    key = json.dumps([cfg.identity.system, cfg.identity.name, cfg.identity.author, forbidden_identities(cfg),
                      cfg.eval.max_new_tokens, cfg.eval.general_max_new_tokens, cfg.training.max_length,
                      [r["messages"] for r in identity_rows], [(r["messages"], r["answer"]) for r in general_rows],
                      [(c["messages"], c["correction"]) for c in cases]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _scores_file(reg: Registry, version: Optional[str], base: str) -> Path:
    if version:
        return reg.path(version) / SCORES_FILE
    return reg.root / BASE_SCORES_DIR / (hashlib.sha256(str(base).encode()).hexdigest()[:12] + ".json")


def cached_scores(reg: Registry, version: Optional[str], base: str, fp: str) -> Optional[dict]:
    return read_json_cache(_scores_file(reg, version, base)).get(fp)


def store_scores(reg: Registry, version: Optional[str], base: str, fp: str, scores: dict) -> None:
    f = _scores_file(reg, version, base)
    f.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(f, {**read_json_cache(f), fp: scores})


def score_base_reference(cfg: Config, base: str) -> bool:
    """Score the base model on the held-out sets into the registry's cache, as `evaluate`
    would when the base is a candidate's reference (a bootstrap). False: already cached."""
    reg = Registry.from_config(cfg)
    identity_rows, general_rows = eval_sets(cfg)
    fp = fingerprint(cfg, identity_rows, general_rows, [])
    if cached_scores(reg, None, base, fp) is not None:
        return False
    model, tokenizer = sft.load_base(base)
    model.eval()
    scores = score_model(model, tokenizer, cfg, identity_rows, general_rows, [])
    store_scores(reg, None, base, fp, {k: scores[k] for k in ("identity", "general")})
    return True


# ---- scores computed in a child process, beside training or the gate ------------


def reference_alongside(cfg: Config, base: str):
    """A bootstrap's gate compares the candidate with the base; where training leaves a
    core idle, score the base in a child process while the anchor trains (on SmolLM2 on a
    2-core CPU that takes a minute and a half off a first run). Returns the process to
    `join`, or None (nothing spare: the gate scores the base itself, as it would anyway)."""
    if not spare_cores(cfg, base):
        return None
    return start_child(_score_reference, (cfg, str(base)), "loopcord-base-reference")


def _score_reference(cfg: Config, base: str) -> None:  # runs in the child process
    child_setup(cfg)
    try:
        score_base_reference(cfg, base)
    except Exception as exc:  # the gate scores the base itself when this left nothing cached
        log_line(f"scoring the base alongside training failed ({type(exc).__name__}: {exc}); the gate will")


def general_answers_alongside(cfg: Config, base: str, adapter: str, general_rows) -> Optional[Callable]:
    """The gate's longest part, the candidate's answers to the held-out general set, in a
    child process while the gate asks the identity and correction questions, computes the
    loss and asks the reference the corrections itself, where the cores allow (SmolLM2 on 2
    cores, a retrain of 10 corrections: 119 s of gate work, 77 s of wall time). Returns `collect()`,
    which waits and gives the answers, or None if the child failed (the gate then asks
    them itself); None instead of a function where nothing is spare."""
    if not spare_cores(cfg, base):
        return None
    receive, send = multiprocessing.Pipe(duplex=False)
    proc = start_child(_general_answers, (cfg, base, adapter, general_rows, send), "loopcord-gate-general")
    send.close()

    def collect() -> Optional[list]:
        try:
            answers = receive.recv()
        except EOFError:
            answers = None
        finally:
            receive.close()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        if answers is None or len(answers) != len(general_rows):
            log_line("the general answers computed alongside were lost; the gate asks them itself")
            return None
        return answers

    return collect


def _general_answers(cfg: Config, base: str, adapter: str, general_rows, send) -> None:  # the child process
    from peft import PeftModel  # imports torch: only in the child

    child_setup(cfg)
    try:
        model, tokenizer = sft.load_base(base)
        model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        send.send(general_answers(model, tokenizer, cfg, general_rows))
    except Exception as exc:
        log_line(f"general answers alongside the gate failed ({type(exc).__name__}: {exc})")
    finally:
        send.close()


def evaluate(cfg: Config, version: str, corrections_file: Optional[str] = None, log=None, progress=None) -> dict:
    """Score `version` and its reference, write eval.json + eval.png, record in the manifest.

    `log(message)` and `progress.phase` (when given) hear about each slow step."""
    from peft import PeftModel  # imports torch: the CLI imports this module without it

    def say(message: str) -> None:
        if log:
            log(message)
        if progress is not None:
            progress.phase("eval", message)

    reg = Registry.from_config(cfg)
    manifest = reg.get(version)
    ref_version = reference_version(reg, version)
    identity_rows, general_rows = eval_sets(cfg)
    cases = correction_cases(cfg, manifest, corrections_file)
    # Identity and general scores are cached per version under a fingerprint of the eval sets
    # alone: a retrain's reference (the live version) was scored when it was itself gated, so
    # only its answers to this run's corrections (a few questions) are asked again.
    fp = fingerprint(cfg, identity_rows, general_rows, [])

    collect = general_answers_alongside(cfg, manifest["base"], str(reg.path(version)), general_rows)
    base, tokenizer = sft.load_base(manifest["base"])
    model = PeftModel.from_pretrained(base, str(reg.path(version)), adapter_name="candidate")
    model.eval()
    say(f"evaluating {version}: {len(identity_rows)} identity questions, {len(general_rows)} general, "
        f"{len(cases)} corrections")
    ref = cached_scores(reg, ref_version, manifest["base"], fp)
    ref_corrections: Optional[dict] = None

    @contextlib.contextmanager
    def reference_active():
        if not ref_version:
            with model.disable_adapter():
                yield
            return
        if "reference" not in model.peft_config:
            model.load_adapter(str(reg.path(ref_version)), adapter_name="reference")
        model.set_adapter("reference")
        try:
            yield
        finally:
            model.set_adapter("candidate")

    def reference_corrections() -> None:  # while the candidate's general answers are computed alongside
        nonlocal ref_corrections
        if ref is not None and collect is not None:
            with reference_active():
                ref_corrections = score_corrections(model, tokenizer, cfg, cases)

    cand = score_model(model, tokenizer, cfg, identity_rows, general_rows, cases, collect, reference_corrections)
    store_scores(reg, version, manifest["base"], fp, {k: cand[k] for k in ("identity", "general")})
    with reference_active():
        if ref is None:
            say(f"eval {version}: scoring the reference ({ref_version or 'base'}) once")
            ref = score_model(model, tokenizer, cfg, identity_rows, general_rows, cases)
            store_scores(reg, ref_version, manifest["base"], fp, {k: ref[k] for k in ("identity", "general")})
            ref_corrections = ref["corrections"]
        elif ref_corrections is None:  # scored when it was itself gated: only this run's corrections are new
            ref_corrections = score_corrections(model, tokenizer, cfg, cases)
    ref = {**ref, "corrections": ref_corrections}
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
            "min_general_retention", "min_retention_questions")},
    }
    write_json_atomic(reg.path(version) / REPORT_FILE, report)
    summary = {
        "identity_accuracy": cand["identity"]["accuracy"],
        "corrections_learned": cand["corrections"]["learned"],
        "corrections_carried_over": cand["corrections"]["carried_over"],
        "corrections_in_context": cand["corrections"]["in_context"],
        "corrections_with_memory": cand["corrections"]["with_memory"],
        "general_loss": cand["general"]["loss"],
        "general_accuracy": cand["general"]["accuracy"],
        "general_retention": retention(cand["general"]["right"], ref["general"]["right"]),
        "reference": ref_version or "base",
        "reference_identity_accuracy": ref["identity"]["accuracy"],
        "reference_general_loss": ref["general"]["loss"],
        "reference_general_accuracy": ref["general"]["accuracy"],
    }
    status = manifest.get("status")
    if status == VersionStatus.CANDIDATE and not passed:
        status = VersionStatus.REJECTED
    elif status == VersionStatus.REJECTED and passed:
        status = VersionStatus.CANDIDATE
    reg.update(version, metrics=summary, gate={"passed": passed, "report": REPORT_FILE,
                                               "failed": [c["name"] for c in checks if not c["passed"]]},
               status=status)
    write_chart(reg, reg.path(version) / CHART_FILE)
    return report


def write_chart(reg: Registry, out: Path) -> None:
    """Scores of every evaluated version (identity, corrections, general accuracy; general loss)."""
    import matplotlib  # slow to import: only where a chart is drawn

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
