"""Chaos: SIGKILL the worker, the trainer and the bot's store writer at random moments.

    python benchmarks/chaos_bench.py [--rounds 3] [--model DIR] [--seed 1] [--no-write]

Three kinds of round, each on real child processes:

worker   `python -m model serve` (tiny base + a live adapter) under four client
         loops; SIGKILL at a random moment, restart on the same port. Counts
         requests that failed with a clear error (the client's typed errors) or
         an unclear one (anything else, or no answer within 60 s), and the time
         from the kill to the next good answer.
trainer  `python -m trainer import` + `promote` of a new version; SIGKILL at a
         random moment. Then the registry's start-up check runs: PROMOTED must
         name a complete version and every earlier version must still read.
store    a child writing exchanges and flags through bot.store, printing each
         acknowledged id; SIGKILL at a random moment, reopen, count the
         acknowledged rows that are missing.

Prints the figures and writes them to benchmarks/RESULTS.md (section
"chaos_bench"). Target: 0 unclear failures, 0 lost, 0 wedged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.results import write_section  # noqa: E402
from model.client import ModelClient, ModelError  # noqa: E402
from model.process import WorkerProcess, child_env, new_worker_key  # noqa: E402

ASK = [{"role": "user", "content": "What is the capital of France?"}]
CLIENT_LOOPS = 4
ANSWER_TIMEOUT_S = 60.0
RECOVER_LIMIT_S = 180.0  # no good answer this long after a kill counts as wedged


@dataclass
class Tally:
    rounds: int = 0
    ok: int = 0
    clear: int = 0  # failed with a typed, worded error
    unclear: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    wedged: int = 0
    recover_s: list[float] = field(default_factory=list)


def default_base(steps: int) -> Path:
    cached = sorted((ROOT / "tests" / ".cache").glob("demo-base-*/model.safetensors"))
    if cached:
        return cached[-1].parent
    from tiny_model import build_default

    return build_default(ROOT / ".loopcord" / "chaos-base", steps=steps)


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


def trainer(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args, "--config", str(config), "--progress", "none"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- worker


async def worker_round(base: Path, adapter: Path, rng: random.Random, tally: Tally, tmp: Path) -> None:
    key = new_worker_key()
    args = ["--model", str(base), "--served-model-name", "tiny", "--lora", f"live={adapter}", "--cpu-threads", "1"]
    proc = WorkerProcess(args, api_key=key, log_path=tmp / "worker.log").start()
    client = ModelClient(proc.url, api_key=key, timeout=ANSWER_TIMEOUT_S)
    killed_at: list[float] = []
    recovered = asyncio.Event()
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(client.chat(ASK, model="live", max_tokens=16, temperature=0), ANSWER_TIMEOUT_S)
                tally.ok += 1
                if killed_at and not recovered.is_set():
                    tally.recover_s.append(time.monotonic() - killed_at[0])
                    recovered.set()
            except ModelError:
                tally.clear += 1
                await asyncio.sleep(0.2)
            except asyncio.TimeoutError:
                tally.unclear.append("no answer within 60 s")
            except Exception as exc:  # noqa: BLE001 - anything untyped is what this bench counts
                tally.unclear.append(f"{type(exc).__name__}: {exc}")

    tasks = [asyncio.create_task(loop()) for _ in range(CLIENT_LOOPS)]
    try:
        await asyncio.sleep(rng.uniform(0.5, 3.0))
        proc.proc.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())
        await asyncio.to_thread(proc.proc.wait)
        restarted = WorkerProcess(args, port=proc.port, api_key=key, log_path=tmp / "worker2.log")
        await asyncio.to_thread(restarted.start)
        try:
            await asyncio.wait_for(recovered.wait(), RECOVER_LIMIT_S)
        except asyncio.TimeoutError:
            tally.wedged += 1
        health = await client.health()
        if health.get("adapters", {}).get("live") != str(adapter):
            tally.lost.append(f"worker: live adapter after restart is {health.get('adapters')}")
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        proc.kill()
        if "restarted" in locals():
            restarted.stop()
    tally.rounds += 1


# ---------------------------------------------------------------- trainer


def trainer_round(config: Path, registry: Path, candidates: list[Path], rng: random.Random, tally: Tally) -> None:
    from trainer.registry import Registry

    reg = Registry(registry)
    before = {v: reg.get(v) for v in reg.versions()}
    adapter = rng.choice(candidates)
    # import a new version, then promote it; the kill lands in whichever child is running
    child = subprocess.Popen([sys.executable, "-m", "trainer", "import", str(adapter), "--config", str(config),
                              "--progress", "json"], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + rng.uniform(0.5, 8.0)
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    version = None
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    else:  # the import finished first: kill the promote instead
        out = child.stdout.read()
        version = next((json.loads(line).get("version") for line in reversed(out.splitlines())
                        if line.startswith("{") and json.loads(line).get("version")), None)
        if version:
            promote = subprocess.Popen([sys.executable, "-m", "trainer", "promote", version, "--config", str(config),
                                        "--progress", "none"], cwd=ROOT, env=child_env(),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 4.0))
            promote.send_signal(signal.SIGKILL)
            promote.wait()
    child.wait()
    started = time.monotonic()
    try:
        repaired = reg.check()
        current = reg.promoted()
        listing = trainer(config, "list")
    except Exception as exc:  # noqa: BLE001
        tally.lost.append(f"trainer: registry unusable after the kill: {type(exc).__name__}: {exc}")
        tally.wedged += 1
        tally.rounds += 1
        return
    tally.recover_s.append(time.monotonic() - started)
    if listing.returncode != 0:
        tally.unclear.append(f"trainer list exited {listing.returncode}: {listing.stderr.strip()[-200:]}")
    if current is not None and current not in reg.versions():
        tally.lost.append(f"trainer: PROMOTED names {current}, which is not a version")
    for v, manifest in before.items():
        try:
            reg.get(v)
        except Exception as exc:  # noqa: BLE001
            tally.lost.append(f"trainer: version {v} unreadable after the kill: {exc}")
    if repaired:
        tally.clear += 1  # repaired at start-up, and said so
    tally.ok += 1
    tally.rounds += 1


# ---------------------------------------------------------------- store (the bot's data)

STORE_WRITER = textwrap.dedent("""
    import asyncio, sys
    from bot.store import Store

    async def main(path):
        store = await Store.open(path)
        i = 0
        while True:
            i += 1
            ex = await store.log_exchange(user_id=i % 7, prompt_messages=[{"role": "user", "content": f"q{i}"}],
                                          answer=f"a{i}", status="complete")
            await store.add_flag(ex, user_id=99, kind="bad", emoji="x")
            print(ex, flush=True)  # acknowledged: the write returned

    asyncio.run(main(sys.argv[1]))
""")


async def store_round(tmp: Path, rng: random.Random, tally: Tally) -> None:
    from bot.store import Store

    db = tmp / f"store-{tally.rounds}.db"
    child = subprocess.Popen([sys.executable, "-c", STORE_WRITER, str(db)], cwd=ROOT, env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    await asyncio.sleep(rng.uniform(1.5, 5.0))
    child.send_signal(signal.SIGKILL)
    out, err = await asyncio.to_thread(child.communicate)
    acked = [int(line) for line in out.split() if line.isdigit()]
    if not acked:
        tally.unclear.append(f"store writer acknowledged nothing: {err.strip()[-200:]}")
    started = time.monotonic()
    store = await Store.open(db)
    try:
        tally.recover_s.append(time.monotonic() - started)
        for ex in acked:
            if await store.get_exchange(ex) is None or not await store.list_flags(ex):
                tally.lost.append(f"store: acknowledged exchange {ex} or its flag missing")
        tally.ok += len(acked)
    finally:
        await store.close()
    tally.rounds += 1


# ---------------------------------------------------------------- main


def summary(name: str, t: Tally) -> str:
    rec = sorted(t.recover_s)
    med = f"{rec[len(rec) // 2]:.2f}" if rec else "-"
    worst = f"{rec[-1]:.2f}" if rec else "-"
    return (f"| {name} | {t.rounds} | {t.ok} | {t.clear} | {len(t.unclear)} | {len(t.lost)} | {t.wedged} | "
            f"{med} | {worst} |")


async def main_async(args) -> int:
    rng = random.Random(args.seed)
    base = Path(args.model) if args.model else default_base(args.base_steps)
    tallies = {"worker": Tally(), "trainer": Tally(), "store": Tally()}
    with tempfile.TemporaryDirectory(prefix="chaos-") as d:
        tmp = Path(d)
        registry = tmp / "registry"
        config = tmp / "config.yaml"
        config.write_text(f"model:\n  base: {base}\ntraining:\n  registry_dir: {registry}\n  work_dir: {tmp / 'runs'}\n")
        candidates = [make_adapter(base, tmp / f"cand{i}", seed=i) for i in range(2)]
        first = trainer(config, "import", str(candidates[0]), "--progress", "json")
        if first.returncode != 0:
            print(f"setup failed: trainer import: {first.stderr[-500:]}", file=sys.stderr)
            return 1
        from trainer.registry import Registry

        reg = Registry(registry)
        v1 = reg.versions()[-1]
        trainer(config, "promote", v1, "--force")
        live = reg.path(reg.promoted())
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: worker", flush=True)
            await worker_round(base, live, rng, tallies["worker"], tmp)
            print(f"round {r + 1}/{args.rounds}: trainer", flush=True)
            await asyncio.to_thread(trainer_round, config, registry, candidates, rng, tallies["trainer"])
            print(f"round {r + 1}/{args.rounds}: store", flush=True)
            await store_round(tmp, rng, tallies["store"])
    rows = "\n".join(summary(n, t) for n, t in tallies.items())
    details = [f"- {n}: {msg}" for n, t in tallies.items() for msg in (t.unclear + t.lost)[:5]]
    body = (f"`python benchmarks/chaos_bench.py --rounds {args.rounds} --seed {args.seed}` (tiny base, one SIGKILL "
            "per round at a random moment).\n\n"
            "| target | rounds | ok (answers / checks / acked writes) | clear failures | unclear failures | lost | "
            "wedged | recover median s | recover worst s |\n|---|---|---|---|---|---|---|---|---|\n" + rows + "\n\n"
            "worker: clear failures are requests refused with the client's typed error while the worker was "
            "down; recover = kill to the next good answer (includes restart and model load). trainer: recover = "
            "the registry's start-up check; a clear failure is a kill the check repaired and reported. store: ok "
            "= acknowledged writes, all found after the kill.\n" + ("\n".join(details) if details else ""))
    print(body)
    if not args.no_write:
        write_section("chaos_bench", body)
    bad = sum(len(t.unclear) + len(t.lost) + t.wedged for t in tallies.values())
    return 0 if bad == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", help="base model dir (default: the test suite's cached tiny base)")
    parser.add_argument("--base-steps", type=int, default=150, help="pretraining steps if a tiny base must be built")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
