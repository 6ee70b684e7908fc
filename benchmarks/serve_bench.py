"""Serving benchmark for the model worker; writes the `serve_bench` section of RESULTS.md.

    PYTHONPATH=. python benchmarks/serve_bench.py [--model PATH] [--max-tokens N]
    PYTHONPATH=. python benchmarks/serve_bench.py --random-qwen7b      # needs a CUDA GPU

Default (CPU): a real `python -m model serve` child process over real HTTP,
with the tiny demo base (built in a temp dir when --model is not given).
Measures time-to-first-token and decode tokens/s of one stream; aggregate
tokens/s at 1, 8 and 32 concurrent streams; the same workload through plain
sequential `model.generate` (the baseline the ratio is against); transformers'
built-in continuous batching (`generate_batch`) on the same workload; and
hot-swap latency with the number of requests failed during swaps.

--random-qwen7b: a randomly initialised model of the real Qwen2.5-7B-Instruct
config (bf16, built on the meta device and materialised on the GPU; speed does
not depend on the weights' values) driven through the same `Engine` in-process:
peak GPU memory at 32 streams of 2k context, single-stream decode as a fraction
of the memory-bandwidth limit, aggregate at 32 streams, swap latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402

CONCURRENCY = (1, 8, 32)
SWAP_ROUNDS = 3
SWAP_STREAMS = 8
TINY_BASE_STEPS = 60  # speed does not depend on how well the base was trained
# Qwen2.5-7B-Instruct (config.json of the released checkpoint).
QWEN7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
QWEN7B_BYTES_PER_TOKEN = 14.1e9  # bf16 weights read once per decode step
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
LONG_CONTEXT = 2048


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: tell me something about the number {i}."}]


def make_adapter(base, out: Path, seed: int, model=None) -> str:
    """A random (non-zero) LoRA adapter on the attention and MLP projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    peft_model.unload()  # give the base back unchanged
    return str(out)


# ---------------------------------------------------------------- HTTP (CPU default)


async def one_stream(session, url: str, messages, model: str, max_tokens: int) -> dict:
    """Stream one request; returns arrival->first token, first->last token, tokens, error."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    first = last = None
    usage, error = None, None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return {"error": f"HTTP {resp.status}: {await resp.text()}"}
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
    except Exception as exc:  # counted as a failed request
        return {"error": f"{type(exc).__name__}: {exc}"}
    if error or usage is None:
        return {"error": error or "stream ended without usage"}
    return {"ttft": (first or time.perf_counter()) - start, "decode_s": (last or start) - (first or start),
            "tokens": usage["completion_tokens"], "end": time.perf_counter()}


async def aggregate(url: str, model: str, n: int, max_tokens: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        start = time.perf_counter()
        results = await asyncio.gather(*[one_stream(s, url, prompt(i), model, max_tokens) for i in range(n)])
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"streams": n, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "failed": n - len(ok),
            "ttft_s": statistics.median(r["ttft"] for r in ok) if ok else float("nan"),
            "decode_tok_s": statistics.median((r["tokens"] - 1) / r["decode_s"] for r in ok if r["decode_s"] > 0)
            if ok else float("nan")}


async def swap_rounds(url: str, adapters: dict, max_tokens: int) -> dict:
    """Swap adapter 'live' between two versions while SWAP_STREAMS requests stream on it."""
    import aiohttp

    latencies, failed, total = [], 0, 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        for r in range(SWAP_ROUNDS):
            tasks = [asyncio.create_task(one_stream(s, url, prompt(i), "live", max_tokens))
                     for i in range(SWAP_STREAMS)]
            await asyncio.sleep(0.3)  # let them get going
            path = adapters["b"] if r % 2 == 0 else adapters["a"]
            start = time.perf_counter()
            async with s.post(url + "/v1/load_lora_adapter",
                              json={"lora_name": "live", "lora_path": path, "load_inplace": True}) as resp:
                assert resp.status == 200, await resp.text()
            latencies.append(time.perf_counter() - start)
            results = await asyncio.gather(*tasks)
            failed += sum("error" in x for x in results)
            total += len(results)
    return {"swap_s": statistics.median(latencies), "swap_max_s": max(latencies), "failed": failed, "total": total}


def sequential_generate(base: str, n: int, max_tokens: int) -> dict:
    """Baseline: the same requests one after another through plain `model.generate`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokens, start = 0, time.perf_counter()
    for i in range(n):
        ids = tok.apply_chat_template(prompt(i), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def engine_in_process(base: str, n: int, max_tokens: int) -> dict:
    """Our Engine without HTTP on the same workload as `transformers_cb` (apples to apples)."""
    from model.adapters import AdapterTable
    from model.engine import Engine
    from model.loading import load_base
    from model.metrics import WorkerMetrics

    loaded = load_base(base, "cpu")
    tok = loaded.tokenizer
    ids = [tok(tok.apply_chat_template(prompt(i), add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"] for i in range(n)]
    engine = Engine(loaded.model, tok, loaded.eos_ids, "cpu", 32, 1024, AdapterTable(), WorkerMetrics())
    engine.start()
    try:
        engine_round(engine, ids[:2], 8)  # warm-up, as generate_batch gets one
        return engine_round(engine, ids, max_tokens)
    finally:
        engine.stop()


def transformers_cb(base: str, n: int, max_tokens: int) -> dict:
    """transformers' built-in continuous batching on the same workload (warm-up run excluded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = [tok(tok.apply_chat_template(prompt(i), add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"] for i in range(n)]
    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)
    model.generate_batch(inputs=ids[:2], generation_config=gen)  # warm-up
    start = time.perf_counter()
    out = model.generate_batch(inputs=ids, generation_config=gen, warmup=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def run_cpu(args) -> str:
    from model.process import WorkerProcess

    tmp = Path(tempfile.mkdtemp(prefix="serve_bench-"))
    base = args.model
    if not base:
        from trainer.demo_base import build_default

        print("building the tiny demo base ...", flush=True)
        base = str(build_default(tmp / "base", steps=TINY_BASE_STEPS))
    adapters = {"a": make_adapter(base, tmp / "a", 1), "b": make_adapter(base, tmp / "b", 2)}
    torch_threads(args.cpu_threads)  # the in-process baselines get the same thread budget as the worker
    worker = WorkerProcess(["--model", base, "--served-model-name", "base", "--max-batch-size", "32",
                            "--cpu-threads", str(args.cpu_threads),
                            "--lora", f"live={adapters['a']}"], log_path=tmp / "worker.log").start(timeout=600)
    try:
        asyncio.run(aggregate(worker.url, "base", 8, 8))  # warm-up: padded multi-row prefill paths too
        rows = {n: asyncio.run(aggregate(worker.url, "base", n, args.max_tokens)) for n in CONCURRENCY}
        for n, r in rows.items():
            print(f"{n:>3} streams: {r['tok_s']:.1f} tok/s, ttft {r['ttft_s']*1000:.0f} ms, failed {r['failed']}")
        swap = asyncio.run(swap_rounds(worker.url, adapters, args.max_tokens))
        print(f"swap: {swap}")
    finally:
        worker.stop()
    seq = sequential_generate(base, max(CONCURRENCY), args.max_tokens)
    print(f"sequential generate: {seq['tok_s']:.1f} tok/s")
    ours = engine_in_process(base, 8, args.max_tokens)
    print(f"engine in-process, 8 requests: {ours['tok_s']:.1f} tok/s")
    cb_rows = [f"| our `Engine` in-process (no HTTP), 8 requests | {ours['tok_s']:.1f} | {ours['tok_s']/seq['tok_s']:.2f}x |"]
    try:
        cb = transformers_cb(base, 8, args.max_tokens)
        cb_rows.append(f"| transformers `generate_batch` in-process, 8 requests (no adapters possible) | "
                       f"{cb['tok_s']:.1f} | {cb['tok_s']/seq['tok_s']:.2f}x |")
        print(f"transformers generate_batch: {cb['tok_s']:.1f} tok/s")
    except Exception as exc:  # record, do not crash the whole benchmark
        cb_rows.append(f"| transformers `generate_batch` | failed: {type(exc).__name__}: {exc} | — |")
    one = rows[1]
    load = os.getloadavg()[0]
    lines = [
        f"Tiny Qwen2-architecture base (`{Path(base).name}`), float32, worker over real HTTP on 127.0.0.1, "
        f"greedy, `ignore_eos`, {args.max_tokens} tokens per request, {args.cpu_threads} torch thread(s) for "
        f"the worker and the baselines alike. Shared machine: 1-min load average "
        f"{load:.1f} on {os.cpu_count()} cores at the end of the run (other jobs compete; treat ratios, not "
        f"absolutes, as the result).",
        "",
        f"- Single stream: time to first token **{one['ttft_s']*1000:.0f} ms**, decode **{one['decode_tok_s']:.1f} tok/s**",
        "",
        "| workload | aggregate tok/s | vs sequential `generate` |",
        "|---|---|---|",
    ]
    for n, r in rows.items():
        lines.append(f"| worker, {n} concurrent stream(s) | {r['tok_s']:.1f} | {r['tok_s']/seq['tok_s']:.2f}x |"
                     + (f" ({r['failed']} failed)" if r["failed"] else ""))
    lines += [f"| plain sequential `model.generate`, {max(CONCURRENCY)} requests | {seq['tok_s']:.1f} | 1.00x |",
              *cb_rows, "",
              f"- Hot-swap (`/v1/load_lora_adapter` on a name with {SWAP_STREAMS} live streams, {SWAP_ROUNDS} rounds): "
              f"median **{swap['swap_s']*1000:.0f} ms**, max {swap['swap_max_s']*1000:.0f} ms; "
              f"failed requests during swaps: **{swap['failed']} / {swap['total']}**",
              "", ENGINE_CHOICE]
    return "\n".join(lines)


ENGINE_CHOICE = """**Engine choice.** transformers' built-in continuous batching (`init_continuous_batching` /
`generate_batch`, paged KV cache) runs on CPU and can stream, but has no per-request LoRA adapter
(no `adapter_names` path: every request in a manager runs the same weights), which is the one thing
this worker must do — mix adapters in a batch and hot-swap them under live requests. Its speed
against our loop on the same in-process workload is in the two rows above. So the worker uses its own gpt-fast style
loop (`model/engine.py`: `prefill`, `decode_step`, left-padded `DynamicCache`, joiners prefilled and
merged, leavers sliced out) with peft's mixed-batch LoRA forward. Known cost: the dynamic cache is
re-concatenated each step (no paged/static cache, no CUDA graphs), so at 32×2k streams on a GPU it
spends extra memory bandwidth that a paged cache would not; vLLM remains the scale-out path (`model.url`)."""


# ---------------------------------------------------------------- random Qwen2.5-7B (GPU)


def build_random_qwen7b(device: str = "cuda"):
    """Qwen2.5-7B-Instruct's architecture with random bf16 weights, materialised on the GPU."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**QWEN7B)
    # Direct init on the GPU: no 15 GB CPU copy, and the rotary buffers are computed there
    # (with meta + to_empty they would be left uninitialised).
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def engine_round(engine, prompts: list[list[int]], max_tokens: int, adapter=None) -> dict:
    """Submit all prompts at once to an in-process Engine; wait for all; timings per request."""
    import threading

    from model.engine import Sequence

    done = threading.Semaphore(0)
    outcomes: list[str] = []

    def emit(event):
        if event[0] in ("done", "error"):
            outcomes.append(event[0])
            done.release()

    start = time.perf_counter()
    seqs = [Sequence(prompt_ids=ids, max_tokens=max_tokens, emit=emit, temperature=0, ignore_eos=True,
                     adapter=adapter() if adapter else None) for ids in prompts]
    for seq in seqs:
        engine.submit(seq)
    for _ in seqs:
        done.acquire()
    wall = time.perf_counter() - start
    tokens = sum(len(s.generated) for s in seqs)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "failed": sum(o != "done" for o in outcomes),
            "ttft_s": statistics.median(s.first_token_at - s.arrival for s in seqs),
            "decode_tok_s": statistics.median((len(s.generated) - 1) / max(s.last_token_at - s.first_token_at, 1e-9)
                                              for s in seqs)}


def run_qwen7b(args) -> str:
    import torch
    from transformers import AutoTokenizer

    from model.adapters import AdapterTable
    from model.engine import Engine
    from model.metrics import WorkerMetrics

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--random-qwen7b needs a CUDA GPU (this machine has none)")
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench-7b-"))
    model = build_random_qwen7b(args.device)
    vocab = QWEN7B["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def random_prompts(n, length):
        return [torch.randint(100, vocab - 1000, (length,), generator=gen).tolist() for _ in range(n)]

    # Tokenizer only turns ids into text for the stream; any byte-level BPE does for speed.
    tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else _tiny_tokenizer(tmp)
    a, b = make_adapter(None, tmp / "a", 1, model=model), make_adapter(None, tmp / "b", 2, model=model)
    adapters = AdapterTable()
    engine = Engine(model, tok, {vocab + 1}, args.device, 32, 1024, adapters, WorkerMetrics())
    engine.start()
    internal = adapters.new_internal_name()
    engine.call(lambda: engine.load_adapter(internal, a)).result()
    adapters.publish("live", internal, a)

    engine_round(engine, random_prompts(2, 64), 8)  # warm-up
    single = engine_round(engine, random_prompts(1, 128), args.max_tokens)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    many = engine_round(engine, random_prompts(32, LONG_CONTEXT), args.max_tokens)
    peak = torch.cuda.max_memory_allocated() if on_gpu else float("nan")
    # Swap under 8 live streams on the adapter.
    import threading

    result = {}
    runner = threading.Thread(target=lambda: result.update(
        engine_round(engine, random_prompts(SWAP_STREAMS, 256), args.max_tokens, adapter=lambda: adapters.acquire("live"))))
    runner.start()
    time.sleep(1.0)
    start = time.perf_counter()
    new = adapters.new_internal_name()
    engine.call(lambda: engine.load_adapter(new, b)).result()
    stale = adapters.publish("live", new, b)
    swap_s = time.perf_counter() - start
    if stale:
        engine.call(lambda: engine.delete_adapter(stale)).result()
    runner.join()
    engine.stop()
    limit = H100_BANDWIDTH / QWEN7B_BYTES_PER_TOKEN
    return "\n".join([
        f"Random-weight Qwen2.5-7B-Instruct architecture, bf16, in-process `Engine`, greedy, {args.max_tokens} tokens.",
        "",
        f"- Single stream: TTFT {single['ttft_s']*1000:.0f} ms, decode **{single['decode_tok_s']:.1f} tok/s** = "
        f"**{single['decode_tok_s']/limit:.0%}** of the bandwidth limit ({limit:.0f} tok/s at "
        f"{QWEN7B_BYTES_PER_TOKEN/1e9:.1f} GB/token, {H100_BANDWIDTH/1e12:.2f} TB/s)",
        f"- 32 streams × {LONG_CONTEXT}-token prompts: aggregate **{many['tok_s']:.0f} tok/s**, "
        f"peak GPU memory **{peak/2**30:.1f} GiB**, failed {many['failed']}",
        f"- Hot-swap with {SWAP_STREAMS} live streams: **{swap_s*1000:.0f} ms**, failed {result.get('failed')}",
    ])


def _tiny_tokenizer(tmp: Path):
    from trainer.demo_base import build_tokenizer

    return build_tokenizer(["hello world", "你好，世界"], vocab_size=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model directory (default: build the tiny demo base)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads on CPU (worker and baselines); 1 avoids spin-waiting on a shared box")
    parser.add_argument("--random-qwen7b", action="store_true", help="random Qwen2.5-7B on a CUDA GPU")
    parser.add_argument("--device", default="cuda", help="--random-qwen7b: the CUDA device")
    parser.add_argument("--tokenizer", help="--random-qwen7b: a tokenizer directory (default: a tiny BPE)")
    args = parser.parse_args()
    if args.random_qwen7b:
        write_section("serve_bench_qwen7b", run_qwen7b(args))
    else:
        write_section("serve_bench", run_cpu(args))
    print(f"written to {Path(__file__).with_name('RESULTS.md')}")


if __name__ == "__main__":
    main()
