"""Bot overhead benchmark: what the bot adds on top of generation, loop stalls, store speed.

The real bot (Core + LoopcordBot over discord.py) runs against the fake Discord
(rate limits loosened, so Discord's own limits do not hide the bot's cost) and
an in-process OpenAI-compatible server that streams a fixed answer instantly.
Everything shares one event loop, so loop-stall figures include the fake
Discord's and the fake model's work too (an upper bound for the bot's).

    PYTHONPATH=. python -m benchmarks.bot_bench [--messages 50] [--concurrent 50]

Writes the "bot_bench" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.results import write_section
from bot.discord_app import PLACEHOLDER, LoopcordBot, StreamedReply
from bot.store import Store
from tests.fake_discord import FakeDiscord
from tests.test_bot_support import Script, ScriptedModelServer, start_bot

ANSWER = "The quick brown fox jumps over the lazy dog. " * 8  # ~360 chars
LOOSE_RATE_LIMIT = (100_000, 1.0)
PROBE_INTERVAL_S = 0.005
TARGET_ADDED_MS = 10.0
TARGET_STALL_MS = 50.0


class TimedModelServer(ScriptedModelServer):
    """Records when each request arrived and when its stream ended, keyed by the question."""

    def __init__(self, script):
        super().__init__(script)
        self.spans: dict[str, tuple[float, float]] = {}

    async def _chat(self, request):
        start = time.perf_counter()
        resp = await super()._chat(request)
        question = self.requests[-1]["messages"][-1]["content"]
        self.spans[question] = (start, time.perf_counter())
        return resp


def instrument(marks: dict) -> None:
    """Record receive, first visible answer edit and logged times per request message id."""
    orig_on_message, orig_show, orig_answer = LoopcordBot.on_message, StreamedReply.show, LoopcordBot.answer

    async def on_message(self, message):
        marks.setdefault(message.id, {})["receive"] = time.perf_counter()
        await orig_on_message(self, message)

    async def show(self, contents):
        await orig_show(self, contents)
        key = getattr(getattr(self.target, "message", None), "id", None)
        rec = marks.setdefault(key, {})
        if "first_edit" not in rec and contents and contents[0] != PLACEHOLDER:
            rec["first_edit"] = time.perf_counter()

    async def answer(self, target, request):
        result = await orig_answer(self, target, request)
        marks.setdefault(request.message_id, {})["logged"] = time.perf_counter()
        return result

    LoopcordBot.on_message, StreamedReply.show, LoopcordBot.answer = on_message, show, answer


async def loop_lag_probe(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(PROBE_INTERVAL_S)
        lags.append((time.perf_counter() - t - PROBE_INTERVAL_S) * 1000)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(int(round(p / 100 * (len(values) - 1))), len(values) - 1)]


async def run_messages(h, server, marks, n: int, concurrent: bool) -> tuple[list[float], list[float]]:
    """Post n questions (one by one, or all at once in n channels); returns added ms per message."""
    user = h.user("bench")
    channels = [h.new_channel(f"bench-{i}") for i in range(n)] if concurrent else [h.new_channel("seq")] * n
    tag = "c" if concurrent else "s"
    questions = [f"{tag}{i} question" for i in range(n)]

    async def one(i):
        msg = await h.fake.post_message(channels[i], user, h.mention(questions[i]))
        await h.exchange_for(msg["id"], timeout=120)
        return int(msg["id"])

    if concurrent:
        ids = await asyncio.gather(*(one(i) for i in range(n)))
    else:
        ids = [await one(i) for i in range(n)]
    first_added, total_added = [], []
    for i, mid in zip(range(n), ids):
        rec = marks[mid]
        gen_start, gen_end = server.spans[questions[i]]
        ttft_model = 0.0  # the server streams instantly; its whole span counts as generation
        first_added.append((rec["first_edit"] - rec["receive"]) * 1000 - ttft_model)
        total_added.append(((rec["logged"] - rec["receive"]) - (gen_end - gen_start)) * 1000)
    return first_added, total_added


async def store_throughput(n_exchanges: int, n_flags: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = await Store.open(Path(tmp) / "bench.db")
        prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q" * 200}]
        t = time.perf_counter()
        ids = await asyncio.gather(*(store.log_exchange(
            user_id=i, prompt_messages=prompt, answer=ANSWER, status="complete",
            answer_message_ids=[10_000 + i]) for i in range(n_exchanges)))
        ex_rate = n_exchanges / (time.perf_counter() - t)
        t = time.perf_counter()
        await asyncio.gather(*(store.add_flag(ids[i % len(ids)], i, "bad", "👎") for i in range(n_flags)))
        flag_rate = n_flags / (time.perf_counter() - t)
        await store.close()
    return ex_rate, flag_rate


async def main_async(args) -> str:
    marks: dict = {}
    instrument(marks)
    server = await TimedModelServer(Script(text=ANSWER, chunk_chars=16)).start()
    fake = await FakeDiscord(rate_limit=LOOSE_RATE_LIMIT, strict=False).start()
    with tempfile.TemporaryDirectory() as tmp:
        h = await start_bot(Path(tmp), fake=fake, model={"url": server.url},
                            discord={"max_in_flight": max(args.concurrent, 1), "edit_interval_s": 1.0})
        try:
            await run_messages(h, server, marks, 5, concurrent=False)  # warm-up
            seq_first, seq_total = await run_messages(h, server, marks, args.messages, concurrent=False)
            stop, lags = asyncio.Event(), []
            probe = asyncio.create_task(loop_lag_probe(stop, lags))
            conc_first, conc_total = await run_messages(h, server, marks, args.concurrent, concurrent=True)
            stop.set()
            await probe
        finally:
            await h.close()
            await server.stop()
    ex_rate, flag_rate = await store_throughput(args.store_rows, args.store_rows * 2)
    max_stall = max(lags)
    seq_med = statistics.median(seq_total)
    lines = [
        f"Real bot (discord.py) on the fake Discord, instant scripted model (answer {len(ANSWER)} chars, "
        f"{len(ANSWER) // 16 + 1} chunks). Added = time the bot spends beyond the model's own stream.",
        "",
        "| measure | median | p95 | max |",
        "|---|---|---|---|",
        f"| receive → first answer edit, sequential ({args.messages} msgs), ms | {statistics.median(seq_first):.1f} | {pct(seq_first, 95):.1f} | {max(seq_first):.1f} |",
        f"| added total (receive → logged, minus generation), sequential, ms | {seq_med:.1f} | {pct(seq_total, 95):.1f} | {max(seq_total):.1f} |",
        f"| receive → first answer edit, {args.concurrent} concurrent, ms | {statistics.median(conc_first):.1f} | {pct(conc_first, 95):.1f} | {max(conc_first):.1f} |",
        f"| added total, {args.concurrent} concurrent, ms | {statistics.median(conc_total):.1f} | {pct(conc_total, 95):.1f} | {max(conc_total):.1f} |",
        f"| event-loop lag during {args.concurrent} concurrent conversations (probe every {PROBE_INTERVAL_S * 1000:.0f} ms), ms | {statistics.median(lags):.2f} | {pct(lags, 95):.2f} | {max_stall:.2f} |",
        "",
        f"Store (aiosqlite, WAL, one connection, concurrent writers): **{ex_rate:.0f} exchanges/s**, "
        f"**{flag_rate:.0f} flags/s** ({args.store_rows} exchanges, {args.store_rows * 2} flags).",
        "",
        f"Targets: added per message < {TARGET_ADDED_MS:.0f} ms (sequential median: {seq_med:.1f} ms, "
        f"{'met' if seq_med < TARGET_ADDED_MS else 'NOT met'}); no loop stall > {TARGET_STALL_MS:.0f} ms "
        f"(max {max_stall:.1f} ms, {'met' if max_stall < TARGET_STALL_MS else 'NOT met'}).",
        "The added time includes the bot's REST round trips to Discord (placeholder post, edits) and the "
        "SQLite log write; the stall figure includes the in-process fake Discord and fake model.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=50)
    p.add_argument("--concurrent", type=int, default=50)
    p.add_argument("--store-rows", type=int, default=2000)
    p.add_argument("--no-write", action="store_true", help="print only, do not update RESULTS.md")
    args = p.parse_args()
    body = asyncio.run(main_async(args))
    print(body)
    if not args.no_write:
        write_section("bot_bench", body)


if __name__ == "__main__":
    main()
