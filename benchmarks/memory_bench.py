"""Teach facts and ask again at once (no retrain): the community memory on SmolLM2.

As a newcomer would: each fact's question is asked in a fresh conversation in one server,
the answer is corrected (the correction as a member types it) and an admin approves it. Then,
each in a fresh conversation: the question as asked and its unseen rewordings (written before
any tuning, benchmarks/data/facts_test.jsonl; tune on facts_dev.jsonl only). An answer is right
when it contains every key of the fact (the data file's `key`; case, spacing, thousands
separators and number words up to twenty aside: independent of the gate's matcher). Retention and identity: every held-out general and identity question is
asked with the memory on; a question the memory adds nothing to gets byte-for-byte the prompt
it had without one (so the same greedy answer), and each one it does add facts to is answered
both ways and compared. Also: retrieval time per question, and a search over 10,000 entries.

    python benchmarks/memory_bench.py                     # the test set, recorded in benchmarks/results/
    python benchmarks/memory_bench.py --facts dev --no-write --min-similarity 0.55
    python benchmarks/memory_bench.py --retrain 3      # teach 3, /retrain, then memory on and off

With --retrain N only the first N facts are taught, then one /retrain (calibrate, gate,
hot-swap) runs as an admin's would; each question is then asked with the memory on and with
it off (the LoRA alone), and the gate's own figures (identity, retention against the parent,
corrections learned as a fresh question) are reported beside the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot import admin  # noqa: E402
from bot.context import Turn  # noqa: E402
from bot.core import Request  # noqa: E402
from bot.runtime import Runtime  # noqa: E402
from model.config import load_config  # noqa: E402
from trainer import datasets as ds  # noqa: E402
from trainer.matching import identity_ok  # noqa: E402

from benchmarks.results import preview, record, table  # noqa: E402

FACTS = {"dev": ROOT / "benchmarks/data/facts_dev.jsonl", "test": ROOT / "benchmarks/data/facts_test.jsonl"}
GUILD, CHANNEL, ADMIN = 1, 10, 999
CONCURRENT = 8
_ids = itertools.count(10**12)


_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven "
                                             "twelve thirteen fourteen fifteen sixteen seventeen eighteen "
                                             "nineteen twenty".split())}


def _plain(text: str) -> str:
    """Case, spacing, thousands separators and number words up to twenty do not matter."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.casefold())
    text = re.sub(r"\b(" + "|".join(_NUMBERS) + r")\b", lambda m: _NUMBERS[m.group(1)], text)
    return " ".join(text.split())


def has_keys(answer: str, keys: list[str]) -> bool:
    plain = _plain(answer)
    return all(re.search(r"(?<!\w)" + re.escape(_plain(k)) + r"(?!\w)", plain) for k in keys)


async def ask(core, question: str, user: int = 7, guild: int = GUILD) -> tuple[str, object]:
    request = Request(user_id=user, turns=[Turn("user", question)], guild_id=guild, channel_id=CHANNEL,
                      message_id=next(_ids))
    stream = core.answer(request)
    async for _ in stream:
        pass
    message_id = next(_ids)
    await core.record(request, stream.result, [message_id])
    return message_id, stream.result


async def ask_without_memory(core, question: str) -> str:
    prompt = core.prompt_for([Turn("user", question)])
    model, _ = await core.model_for_answer()
    out = []
    async for delta in core.client.stream_chat(prompt, model=model, max_tokens=core.cfg.model.max_tokens,
                                               temperature=0.0, top_p=1.0):
        out.append(delta)
    return "".join(out)


async def run(args) -> dict:
    facts = [json.loads(line) for line in FACTS[args.facts].read_text().splitlines() if line.strip()]
    if args.retrain:
        facts = facts[:args.retrain]
    cfg = load_config(ROOT / "config.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    cfg.store.path = str(tmp / "loopcord.db")
    cfg.training.registry_dir = str(cfg.path(cfg.training.registry_dir).resolve())
    cfg.memory.cache_dir = str(cfg.path(cfg.memory.cache_dir).resolve())
    cfg.model.temperature, cfg.model.max_tokens = 0.0, args.max_tokens
    if args.min_similarity is not None:
        cfg.memory.min_similarity = args.min_similarity
    if args.max_facts is not None:
        cfg.memory.max_facts = args.max_facts
    runtime = await Runtime.start(cfg)
    core = runtime.core
    started_on = runtime.live.version
    try:
        for i, f in enumerate(facts):  # taught as a member would, approved by an admin
            message_id, _ = await ask(core, f["question"], user=100 + i)
            row = await core.suggest_correction(message_id, 100 + i, f["correction"])
            await admin.review(core.store, row["id"], "approved", ADMIN, cfg=cfg, memory=core.memory)
        retrain = None
        if args.retrain:
            started = time.perf_counter()
            result = await runtime.retrain("manual", ADMIN)
            report = result.report or {}
            retrain = {"status": str(result.status), "seconds": round(time.perf_counter() - started, 1),
                       "message": result.message, "metrics": (runtime.registry.get(result.version).get("metrics")
                                                              if result.version else None),
                       "checks": report.get("checks"), "live": runtime.live.version}
        rows, recall_ms = [], []
        gate = asyncio.Semaphore(CONCURRENT)  # the worker batches concurrent requests

        async def reask(f: dict, how: str, q: str) -> None:
            async with gate:
                _, result = await ask(core, q)
            shown = result.text + "".join(f" {x.answer}" for x in result.quoted)  # what a member reads
            lora_alone = await ask_without_memory(core, q) if args.retrain else ""
            rows.append({"kind": f["kind"], "how": how, "question": q, "answer": result.text,
                         "right": has_keys(shown, f["key"]), "model_right": has_keys(result.text, f["key"]),
                         "lora_right": has_keys(lora_alone, f["key"]), "lora_answer": lora_alone,
                         "footer": bool(result.sources or result.quoted),
                         "facts": [x.correction_id for x in result.facts]})

        for f in facts:  # retrieval alone, one question at a time (what one answer waits for)
            for q in [f["question"], *f["rewordings"]]:
                t = time.perf_counter()
                await core.memory.recall(f"guild:{GUILD}", q)
                recall_ms.append((time.perf_counter() - t) * 1000)
        await asyncio.gather(*(reask(f, how, q) for f in facts
                               for how, q in [("asked", f["question"])] + [("reworded", r) for r in f["rewordings"]]))
        identity_rows, general_rows = eval_questions(cfg)
        unrelated = {"general": [], "identity": []}

        async def unrelated_one(group: str, q: str, check) -> None:
            async with gate:
                found = await core.memory.recall(f"guild:{GUILD}", q)
                if group == "identity":  # few: all asked, for the identity share with the memory on
                    _, result = await ask(core, q)
                    unrelated[group].append({"question": q, "changed": bool(found), "right_now": check(result.text),
                                             "answer": result.text})
                    return
                if not found:
                    unrelated[group].append({"question": q, "changed": False})
                    return
                _, result = await ask(core, q)
                before = await ask_without_memory(core, q)
                pinned = [f.answer for f in result.sources or result.quoted]
                unrelated[group].append({"question": q, "changed": True, "answer": result.text, "before": before,
                                         "right_before": check(before), "right_now": check(result.text),
                                         "facts": [f.answer for f in found], "pinned": pinned,
                                         "pinned_wrongly": bool(pinned) and not any(check(a) for a in pinned)})

        await asyncio.gather(*(unrelated_one(g, q, check) for g, questions in
                               (("general", general_rows), ("identity", identity_rows)) for q, check in questions))
        search_10k_ms = await search_10k(core)
    finally:
        if runtime.live.version != started_on and started_on:
            # The trainer child works in the config's own registry: a run that passed goes back to
            # where the bench started, so the next run starts from the same parent.
            await runtime.rollback(started_on)
        await runtime.close()
    res = summarize(rows, unrelated, recall_ms, search_10k_ms, cfg, args)
    res["retrain"] = retrain
    if retrain:
        for how in ("asked", "reworded"):
            res[f"{how}_lora_alone"] = round(share([r for r in rows if r["how"] == how], lambda r: r["lora_right"]), 3)
    return res


def eval_questions(cfg):
    identity, general = [], []
    for _, row in ds.read_jsonl_rows(ds.DATA_DIR / ds.IDENTITY_EVAL_FILE):
        msgs = ds.fill_identity(ds.row_to_messages(row, "identity"), cfg.identity.fill)
        identity.append((msgs[-2]["content"], lambda a: identity_ok(a, cfg.identity.name, cfg.identity.author)))
    for _, row in ds.read_jsonl_rows(ds.DATA_DIR / ds.GENERAL_EVAL_FILE):
        msgs = ds.row_to_messages(row, "general")
        answer = row.get("answer") or msgs[-1]["content"]
        general.append((msgs[-2]["content"], lambda a, ans=answer: ans.casefold() in a.casefold()))
        # a fact that gives this question's answer is one it was right to get
    return identity, general


async def search_10k(core) -> float:
    """Time one question against 10,000 entries in one scope (random unit vectors)."""
    import torch

    mem = core.memory
    n, scope = 10_000, "bench:10k"
    matrix = torch.nn.functional.normalize(torch.randn(n, mem.embedder.dim), dim=-1)
    entries = [{"correction_id": i, "question": f"q{i}", "answer": f"a{i}", "suggested_by": 1, "approved_by": 2}
               for i in range(n)]
    mem._cache[scope] = (core.store.memory_generation, entries, matrix)
    times = []
    for q in ("When is the book club?", "Who runs the wiki?", "What is the capital of Australia?") * 5:
        t = time.perf_counter()
        await mem.recall(scope, q)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def share(rows, pred=lambda r: r["right"]) -> float:
    return sum(1 for r in rows if pred(r)) / len(rows) if rows else float("nan")


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def summarize(rows, unrelated, recall_ms, search_10k_ms, cfg, args) -> dict:
    out = {"facts": args.facts, "min_similarity": cfg.memory.min_similarity, "max_facts": cfg.memory.max_facts}
    for how in ("asked", "reworded"):
        sel = [r for r in rows if r["how"] == how]
        out[how] = round(share(sel), 3)
        out[f"{how}_model_words"] = round(share(sel, lambda r: r["model_right"]), 3)
        for kind in ("community", "common"):
            out[f"{how}_{kind}"] = round(share([r for r in sel if r["kind"] == kind]), 3)
    out["n_facts"] = sum(1 for r in rows if r["how"] == "asked")
    out["n_reworded"] = sum(1 for r in rows if r["how"] == "reworded")
    out["footer_when_right"] = round(share([r for r in rows if r["right"]], lambda r: r["footer"]), 3)
    ident = unrelated["identity"]
    out["identity_questions"] = len(ident)
    out["identity_prompts_changed"] = sum(1 for i in ident if i["changed"])
    out["identity_with_memory"] = round(share(ident, lambda i: i["right_now"]), 4)
    for group, items in (("general", unrelated["general"]),):
        changed = [i for i in items if i["changed"]]
        kept = [i for i in changed if i["right_before"]]
        right_before = sum(1 for i in items if not i["changed"]) + len(kept)  # unchanged prompts: same answer
        lost = sum(1 for i in kept if not i["right_now"])
        out[f"{group}_questions"] = len(items)
        out[f"{group}_prompts_changed"] = len(changed)
        out[f"{group}_kept"] = round(1 - lost / right_before, 4) if right_before else None
        out[f"{group}_pinned_wrongly"] = sum(1 for i in changed if i["pinned_wrongly"])
    out["recall_ms_p50"] = round(statistics.median(recall_ms), 1)
    out["recall_ms_p95"] = round(p95(recall_ms), 1)
    out["search_10k_ms_p50"] = round(search_10k_ms, 1)
    out["misses"] = [{k: r[k] for k in ("question", "answer", "facts")} for r in rows if not r["right"]]
    out["changed"] = {g: [i for i in items if i["changed"]] for g, items in unrelated.items()}
    return out


def report(res: dict) -> dict:
    """Right after /approve: the figures for `record`."""
    return dict(
        text=[f"Right after `/approve`, no retrain: {res['n_facts']} held-out facts taught in one server "
              f"({res['facts']} set), each asked again in a fresh conversation. SmolLM2-135M-Instruct with its "
              f"identity adapter, greedy, the embedded worker; memory.min_similarity {res['min_similarity']}, "
              f"max_facts {res['max_facts']}. `python benchmarks/memory_bench.py`"],
        tables=[
            table(["", "all", "community facts", "common facts"], [
                ["corrected questions, as asked", f"{res['asked']:.1%}", f"{res['asked_community']:.1%}",
                 f"{res['asked_common']:.1%}"],
                [f"unseen rewordings ({res['n_reworded']})", f"{res['reworded']:.1%}",
                 f"{res['reworded_community']:.1%}", f"{res['reworded_common']:.1%}"]]),
            table(["held-out check, memory on", "result"], [
                ["general questions answered right before, still right",
                 f"{res['general_kept']:.1%} ({res['general_prompts_changed']} of {res['general_questions']} "
                 "prompts got a fact)"],
                ["general questions shown a 📌 line whose fact does not answer them",
                 f"{res['general_pinned_wrongly'] / res['general_questions']:.1%} ({res['general_pinned_wrongly']})"],
                ["identity questions answered as Loopcord",
                 f"{res['identity_with_memory']:.1%} ({res['identity_prompts_changed']} of "
                 f"{res['identity_questions']} prompts got a fact)"],
                ["right answers with a 📌 line (source or quote)", f"{res['footer_when_right']:.1%}"],
                ["retrieval per question, p50 / p95", f"{res['recall_ms_p50']} / {res['recall_ms_p95']} ms"],
                ["one search over 10,000 entries (p50, embedding included)", f"{res['search_10k_ms_p50']} ms"]],
                text=["Right means the answer a member reads contains every key of the fact: the model's words, "
                      "or the fact quoted under them (📌) when the model did not state the fact it was given. In "
                      f"the model's own words alone: {res['asked_model_words']:.1%} as asked, "
                      f"{res['reworded_model_words']:.1%} of the rewordings."])])


def retrain_report(res: dict) -> dict:
    """After one /retrain: the figures for `record`."""
    r, m = res["retrain"], res["retrain"]["metrics"] or {}
    return dict(
        text=[f"{res['n_facts']} held-out facts ({res['facts']} set) taught in one server, then one `/retrain` "
              "(SmolLM2, cpu-small profile, 2 cores). `python benchmarks/memory_bench.py --retrain N`",
              f"Run: **{r['status']}** in {r['seconds']:.0f} s. {r['message']}"],
        tables=[table(["after the retrain", "as asked", "unseen rewordings"], [
            ["memory on (what members read)", f"{res['asked']:.1%}", f"{res['reworded']:.1%}"],
            [f"memory off: the live LoRA alone ({r['live']})", f"{res['asked_lora_alone']:.1%}",
             f"{res['reworded_lora_alone']:.1%}"]])],
        notes=["Gate (memory off): identity {0}, general retention vs the parent {1}, corrections learned as a fresh "
               "question {2}, in their conversation {3}, with the memory {4}.".format(
                   *(m.get(k) for k in ("identity_accuracy", "general_retention", "corrections_learned",
                                        "corrections_in_context", "corrections_with_memory")))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", choices=sorted(FACTS), default="test")
    p.add_argument("--min-similarity", type=float)
    p.add_argument("--max-facts", type=int)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-write", action="store_true", help="print only (for tuning on the dev set)")
    p.add_argument("--json", type=Path, help="also write the full result here")
    p.add_argument("--retrain", type=int, default=0, help="teach this many facts, then /retrain")
    args = p.parse_args()
    res = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    print(preview("memory_bench", **report(res)))
    print(json.dumps({k: v for k, v in res.items() if k not in ("misses", "changed")}))
    if args.retrain:
        name, parts = f"memory_bench_retrain_{args.retrain}", retrain_report(res)
        print(preview(name, **parts))
        if not args.no_write and args.facts == "test":
            record(name, **parts)
    elif not args.no_write and args.facts == "test":
        record("memory_bench", **report(res))


if __name__ == "__main__":
    main()
