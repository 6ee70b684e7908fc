"""Bot overhead benchmark: what the bot adds on top of generation, loop stalls, store speed.

The real bot (Core + LoopcordBot over discord.py, the real model client and
SQLite store) runs in this process. Its world runs in a child process with its
own event loop: the fake Discord (rate limits loosened, so Discord's own limits
do not hide the bot's cost) and an OpenAI-compatible server that streams a
fixed answer instantly. So the loop-lag probe here measures the bot's loop
alone, and the world's cost is reported separately, from a probe in the child.
The benchmark drives the world over a small control API on 127.0.0.1.

Both processes stamp events with time.monotonic() (CLOCK_MONOTONIC, one clock
for the whole machine), so the model's span measured in the child can be
subtracted from the bot's receive → logged time measured here.

    PYTHONPATH=. python -m benchmarks.bot_bench [--messages 50] [--concurrent 50]

Records its figures in benchmarks/results/bot_bench.json (and RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import aiohttp
import yaml
from aiohttp import web

from benchmarks.results import preview, record, table
from bot.core import Core
from bot.discord_app import PLACEHOLDER, LoopcordBot, StreamedReply
from bot.store import Store
from model.config import load_config

ANSWER = "The quick brown fox jumps over the lazy dog. " * 8  # ~360 chars
CHUNK_CHARS = 16
LOOSE_RATE_LIMIT = (100_000, 1.0)
PROBE_INTERVAL_S = 0.005
TARGET_ADDED_MS = 10.0
TARGET_STALL_MS = 50.0
WARMUP_MESSAGES = 5
ANSWER_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 30.0



# ---------------------------------------------------------------- the world (child process)


async def loop_lag_probe(stop: asyncio.Event, lags: list[float]) -> None:
    """How late a 5 ms sleep wakes up: the longest time this loop could not run anything."""
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(PROBE_INTERVAL_S)
        lags.append((time.monotonic() - t - PROBE_INTERVAL_S) * 1000)


class Probe:
    def __init__(self) -> None:
        self.stop, self.lags, self.task = asyncio.Event(), [], None

    def start(self) -> None:
        self.stop, self.lags = asyncio.Event(), []
        self.task = asyncio.create_task(loop_lag_probe(self.stop, self.lags))

    async def finish(self) -> list[float]:
        self.stop.set()
        await self.task
        return self.lags


async def serve_world(channels: int) -> None:
    """Fake Discord + instant model + control API; prints its addresses as one JSON line."""
    from devkit.fake_discord import FakeDiscord
    from devkit.scripted_model import Script, ScriptedModelServer

    class TimedModelServer(ScriptedModelServer):
        """Records when each request arrived and when its stream ended, keyed by the question."""

        def __init__(self, script):
            super().__init__(script)
            self.spans: dict[str, tuple[float, float]] = {}

        async def _chat(self, request):
            start = time.monotonic()
            resp = await super()._chat(request)
            self.spans[self.requests[-1]["messages"][-1]["content"]] = (start, time.monotonic())
            return resp

    model = await TimedModelServer(Script(text=ANSWER, chunk_chars=CHUNK_CHARS)).start()
    fake = await FakeDiscord(rate_limit=LOOSE_RATE_LIMIT, strict=False).start()
    guild = fake.add_guild("Bench guild")
    fake.add_channel(guild, "general")
    user = fake.add_user("bench")
    fake.add_member(guild, user)
    chans = [fake.add_channel(guild, f"bench-{i}") for i in range(channels)]
    probe = Probe()

    async def post(request: web.Request) -> web.Response:
        posts = await request.json()
        msgs = await asyncio.gather(*(fake.post_message(p["channel"], user, f"<@{fake.bot_id}> {p['text']}")
                                      for p in posts))
        return web.json_response([int(m["id"]) for m in msgs])

    async def spans(request: web.Request) -> web.Response:
        return web.json_response(model.spans)

    async def probe_start(request: web.Request) -> web.Response:
        probe.start()
        return web.json_response({})

    async def probe_stop(request: web.Request) -> web.Response:
        return web.json_response(await probe.finish())

    app = web.Application()
    app.router.add_post("/post", post)
    app.router.add_get("/spans", spans)
    app.router.add_post("/probe/start", probe_start)
    app.router.add_post("/probe/stop", probe_stop)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    control = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    print(json.dumps({"control": control, "model": model.url, "api_base": fake.api_base,
                      "gateway_url": fake.gateway_url, "token": fake.token, "channels": chans}), flush=True)
    # Serve until the benchmark closes our stdin (or dies).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await fake.stop()
    await model.stop()
    await runner.cleanup()


class World:
    """The child process from the bot's side."""

    def __init__(self, proc: asyncio.subprocess.Process, info: dict, http: aiohttp.ClientSession):
        self.proc, self.info, self.http = proc, info, http

    @classmethod
    async def start(cls, channels: int) -> "World":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.bot_bench", "--world", "--concurrent", str(channels),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
        if not line:
            raise RuntimeError("the benchmark's world process exited before it was ready (see its stderr)")
        return cls(proc, json.loads(line), aiohttp.ClientSession())

    async def call(self, method: str, path: str, body=None):
        async with self.http.request(method, self.info["control"] + path, json=body) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def stop(self) -> None:
        await self.http.close()
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# ---------------------------------------------------------------- the bot (this process)


class Marks:
    """Per request message id: receive, first visible answer edit, logged; a future per answer."""

    def __init__(self) -> None:
        self.times: dict[int, dict[str, float]] = {}
        self._logged: dict[int, asyncio.Future] = {}

    def logged(self, mid: int) -> asyncio.Future:
        return self._logged.setdefault(mid, asyncio.get_running_loop().create_future())

    def instrument(self) -> None:
        """Wrap the bot's entry, its Discord writes and its logging step with timestamps."""
        marks = self
        orig_on_message, orig_show, orig_answer = LoopcordBot.on_message, StreamedReply.show, LoopcordBot.answer

        async def on_message(bot, message):
            marks.times.setdefault(message.id, {})["receive"] = time.monotonic()
            await orig_on_message(bot, message)

        async def show(reply, contents):
            await orig_show(reply, contents)
            key = getattr(getattr(reply.target, "message", None), "id", None)
            rec = marks.times.setdefault(key, {})
            if "first_edit" not in rec and contents and contents[0] != PLACEHOLDER:
                rec["first_edit"] = time.monotonic()

        async def answer(bot, target, request):
            result = await orig_answer(bot, target, request)
            marks.times.setdefault(request.message_id, {})["logged"] = time.monotonic()
            marks.logged(request.message_id).set_result(result)
            return result

        LoopcordBot.on_message, StreamedReply.show, LoopcordBot.answer = on_message, show, answer


async def start_bot(tmp: Path, world: World, max_in_flight: int) -> tuple[Core, LoopcordBot, asyncio.Task]:
    info = world.info
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "discord": {"api_base": info["api_base"], "gateway_url": info["gateway_url"], "guild_ready_timeout": 0.05,
                    "edit_interval_s": 1.0, "user_rate_limit": 1_000_000, "max_in_flight": max_in_flight},
        "store": {"path": str(tmp / "bench.db")},
        "model": {"url": info["model"]},
    }), encoding="utf-8")
    core = await Core.create(load_config(cfg_path))
    bot = LoopcordBot(core)
    task = asyncio.create_task(bot.start(info["token"]))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not bot.is_ready():
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError(f"the bot did not connect to the fake Discord: {task.exception() if task.done() else 'timeout'}")
        await asyncio.sleep(0.01)
    return core, bot, task


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(int(round(p / 100 * (len(values) - 1))), len(values) - 1)]


async def run_messages(world: World, marks: Marks, tag: str, n: int, concurrent: bool
                       ) -> tuple[list[float], list[float]]:
    """Post n questions (one by one in one channel, or all at once in n channels); added ms per message."""
    chans = world.info["channels"]
    questions = [f"{tag}{i} question" for i in range(n)]
    if concurrent:
        ids = await world.call("POST", "/post", [{"channel": chans[i], "text": q} for i, q in enumerate(questions)])
        await asyncio.wait_for(asyncio.gather(*(marks.logged(mid) for mid in ids)), ANSWER_TIMEOUT_S)
    else:
        ids = []
        for q in questions:
            (mid,) = await world.call("POST", "/post", [{"channel": chans[0], "text": q}])
            await asyncio.wait_for(marks.logged(mid), ANSWER_TIMEOUT_S)
            ids.append(mid)
    spans = await world.call("GET", "/spans")
    first_added, total_added = [], []
    for q, mid in zip(questions, ids):
        rec = marks.times[mid]
        gen_start, gen_end = spans[q]
        # The model streams instantly; its whole span counts as generation, not as the bot's.
        first_added.append((rec["first_edit"] - rec["receive"]) * 1000)
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


async def measure(args) -> dict:
    marks = Marks()
    marks.instrument()
    world = await World.start(max(args.concurrent, 1))
    core: Optional[Core] = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            core, bot, task = await start_bot(Path(tmp), world, max(args.concurrent, 1))
            try:
                await run_messages(world, marks, "w", WARMUP_MESSAGES, concurrent=False)
                probe = Probe()
                probe.start()
                seq = await run_messages(world, marks, "s", args.messages, concurrent=False)
                seq_lags = await probe.finish()
                probe.start()
                await world.call("POST", "/probe/start")
                conc = await run_messages(world, marks, "c", args.concurrent, concurrent=True)
                conc_lags = await probe.finish()
                world_lags = await world.call("POST", "/probe/stop")
            finally:
                await bot.close()
                await asyncio.gather(task, return_exceptions=True)
                await core.close()
    finally:
        await world.stop()
    ex_rate, flag_rate = await store_throughput(args.store_rows, args.store_rows * 2)
    return dict(seq=seq, conc=conc, seq_lags=seq_lags, conc_lags=conc_lags, world_lags=world_lags,
                ex_rate=ex_rate, flag_rate=flag_rate)


def report(r: dict, args) -> dict:
    (seq_first, seq_total), (conc_first, conc_total) = r["seq"], r["conc"]
    seq_med, max_stall = statistics.median(seq_total), max(r["conc_lags"] + r["seq_lags"])

    def row(label, values, fmt=".1f"):
        return [label, f"{statistics.median(values):{fmt}}", f"{pct(values, 95):{fmt}}", f"{max(values):{fmt}}"]

    probe = f"probe every {PROBE_INTERVAL_S * 1000:.0f} ms"
    return dict(
        text=[f"Real bot (discord.py, model client, SQLite store) in one process; the fake Discord and an instant "
              f"scripted model (answer {len(ANSWER)} chars, {len(ANSWER) // CHUNK_CHARS + 1} chunks) in another, with "
              f"their own event loop. Added = time the bot spends beyond the model's own stream."],
        tables=[table(["measure", "median", "p95", "max"], [
            row(f"receive → first answer edit, sequential ({args.messages} msgs), ms", seq_first),
            row("added total (receive → logged, minus generation), sequential, ms", seq_total),
            row(f"receive → first answer edit, {args.concurrent} concurrent, ms", conc_first),
            row(f"added total, {args.concurrent} concurrent, ms", conc_total),
            row(f"bot event-loop lag, sequential ({probe}), ms", r["seq_lags"], ".2f"),
            row(f"bot event-loop lag, {args.concurrent} concurrent conversations ({probe}), ms", r["conc_lags"], ".2f"),
            row(f"fake Discord + model process loop lag, {args.concurrent} concurrent (not the bot's), ms",
                r["world_lags"], ".2f")])],
        notes=[f"Store (aiosqlite, WAL, one connection, concurrent writers): **{r['ex_rate']:.0f} exchanges/s**, "
               f"**{r['flag_rate']:.0f} flags/s** ({args.store_rows} exchanges, {args.store_rows * 2} flags).",
               f"Targets: added per message < {TARGET_ADDED_MS:.0f} ms (sequential median: {seq_med:.1f} ms, "
               f"{'met' if seq_med < TARGET_ADDED_MS else 'NOT met'}); no bot loop stall > {TARGET_STALL_MS:.0f} ms "
               f"(max {max_stall:.1f} ms, {'met' if max_stall < TARGET_STALL_MS else 'NOT met'}). "
               "The added time includes the bot's REST round trips to the fake Discord (placeholder post, final "
               f"edit) and the SQLite log write; the concurrent figures are dominated by {args.concurrent} answers "
               "sharing two CPU cores."])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=50)
    p.add_argument("--concurrent", type=int, default=50)
    p.add_argument("--store-rows", type=int, default=2000)
    p.add_argument("--no-write", action="store_true", help="print only, record nothing")
    p.add_argument("--world", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.world:
        asyncio.run(serve_world(args.concurrent))
        return
    parts = report(asyncio.run(measure(args)), args)
    print(preview("bot_bench", **parts))
    if not args.no_write:
        record("bot_bench", **parts)


if __name__ == "__main__":
    main()
