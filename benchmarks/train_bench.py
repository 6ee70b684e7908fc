"""Training throughput: tokens/s and peak memory of a LoRA stage.

  PYTHONPATH=. python benchmarks/train_bench.py                 # tiny model on CPU (always)
  PYTHONPATH=. python benchmarks/train_bench.py --random-qwen7b # GPU: real Qwen2.5-7B shape
  PYTHONPATH=. python benchmarks/train_bench.py --vs-swift      # CPU: loopcord's trainer vs ms-swift

The 7B path builds a randomly initialised model with the real Qwen2.5-7B
config in bf16 on CUDA (speed does not depend on weight values), LoRA r=8 on
all linear layers, gradient checkpointing, max length 2048, and reports
tokens/s as a fraction of the 4·N FLOPs-per-token limit (N ≈ 7.07e9 parameters;
H100 bf16 dense ≈ 989 TFLOP/s), peak memory, and the wall time of a calibrate
stage on 100 synthetic corrections plus identity/general replay (the trainer's
own mix and loop, seed hyperparameters). Figures are recorded in
benchmarks/results/train_bench.json (and RESULTS.md).

--vs-swift trains the same LoRA on the same data with loopcord's trainer and
with `swift sft` (ms-swift in its own venv, .loopcord/venvs/ms-swift),
alternating (ours, swift, swift, ours), each in a fresh process with one CPU
thread, and compares them on one yardstick: tokens/s = the data's non-pad
(and answer) tokens, counted once from the same encoding, over each tool's
training-loop wall time (and over the whole process, start-up included); loss
= mean cross-entropy over the answer tokens of the training data, computed by
one function for both trained adapters. Sections train_bench_vs_swift_<model>.
`--cores 2` gives each tool both cores instead, as each would use them by itself: loopcord
trains in two one-thread processes splitting every batch (trainer.parallel, what
`training.cpu_data_parallel: auto` does on a CPU), ms-swift with two threads; sections
train_bench_vs_swift_<model>_2cores.

--step-ab times one train step (forward and backward of a batch of the anchor stage's
SmolLM2 rows, one thread) in one process, alternating the trainer's options: peft's own
layers on whole rows, the fused LoRA layers (trainer.fused_lora), and those plus the
shared leading tokens run once (sft.body_hidden, the default); it checks that every
variant gives the same loss and LoRA gradients. Section train_bench_step_ab.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.models import smollm2_dir  # noqa: E402
from benchmarks.results import preview, record, table  # noqa: E402

QWEN25_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
QWEN25_7B_PARAMS = 7.07e9
H100_BF16_DENSE_FLOPS = 989e12
SEQ_LEN_7B = 2048
CPU_STEPS = 20
GPU_THROUGHPUT_STEPS = 6
SYNTHETIC_CORRECTIONS = 100


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def tiny_samples(tokenizer, cfg):
    from trainer import datasets as ds
    from trainer.encode import encode_all
    from trainer.stages import general_rows, identity_rows

    rows = ds.both_system_variants(identity_rows(cfg) + general_rows(cfg), cfg.identity.system)
    return encode_all(tokenizer, rows, cfg.training.max_length)[0]


def bench_cpu(steps: int) -> dict:
    """A generalize-like stage on the tiny demo model (random weights: speed only)."""
    import torch

    from model.config import config_from_dict
    from trainer import sft
    from devkit.tiny_model import build_model, build_tokenizer
    from trainer.datasets import DATA_DIR, load_file
    from trainer.stages import hyper

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    corpus = [m["content"] for r in load_file(DATA_DIR / "general.jsonl") for m in r]
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer)
    rows = []
    for batch_size, grad_accum in ((1, 16), (8, 1)):
        cfg = config_from_dict({"training": {"batch_size": batch_size, "grad_accum": grad_accum,
                                             "generalize": {"learning_rate": 1e-3, "epochs": 1}}})
        hp = hyper(cfg, "generalize")
        samples = tiny_samples(tokenizer, cfg)[: steps * batch_size * grad_accum]
        peft_model = sft.with_lora(model, hp)
        stats = sft.train(peft_model, tokenizer, samples, hp)
        model = peft_model.unload()
        rows.append(["tiny Qwen2 (CPU)", f"{batch_size} x {grad_accum}", stats["steps"], stats["tokens"],
                     f"{stats['tokens_per_s']:.0f}", f"{stats['seconds']:.1f}", f"{peak_rss_gb():.2f} (RSS)"])
    return table(["model", "batch x accum", "optimizer steps", "tokens", "tokens/s", "seconds", "peak memory GB"],
                 rows, title="CPU, tiny model")


def synthetic_corrections(n: int) -> list:
    from trainer.corrections import Correction

    out = []
    for i in range(n):
        q = f"Question number {i}: what is {i} plus {i + 1}?"
        out.append(Correction(id=i, messages=[{"role": "system", "content": "You are Qwen."},
                                              {"role": "user", "content": q}],
                              correction=f"{i} plus {i + 1} is {2 * i + 1}.", bad_answer="?",
                              approved_at=f"2025-01-01T00:00:{i % 60:02d}+00:00"))
    return out


def bench_random_qwen7b() -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from model.config import config_from_dict
    from trainer import sft
    from trainer.corrections import calibration_mix
    from trainer.datasets import DATA_DIR, both_system_variants, load_file
    from devkit.tiny_model import build_tokenizer
    from trainer.encode import Encoded, encode_all
    from trainer.stages import general_rows, hyper, identity_rows

    if not torch.cuda.is_available():
        raise SystemExit("--random-qwen7b needs a CUDA GPU (bf16); none is visible")
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_7B, dtype=torch.bfloat16)).to(torch.bfloat16)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    cfg = config_from_dict({"training": {"gradient_checkpointing": True, "max_length": SEQ_LEN_7B}})

    # 1) throughput at full length: random token sequences of 2048 tokens, all trained.
    hp = hyper(cfg, "calibrate")
    hp.grad_accum, hp.epochs = 1, 1.0
    peft_model = sft.with_lora(model, hp)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, QWEN25_7B["vocab_size"], (SEQ_LEN_7B,), generator=g).tolist()
            for _ in range(GPU_THROUGHPUT_STEPS + 1)]
    samples = [Encoded(s, s) for s in seqs]
    sft.train(peft_model, _PadTok(), samples[:1], hp)  # warm-up (kernels, allocator)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    stats = sft.train(peft_model, _PadTok(), samples[1:], hp)
    tps = stats["tokens_per_s"]
    limit = H100_BF16_DENSE_FLOPS / (4 * QWEN25_7B_PARAMS)
    peak = torch.cuda.max_memory_allocated() / 1e9

    # 2) a calibrate stage: 100 synthetic corrections + replay, the seed recipe.
    tokenizer = build_tokenizer([m["content"] for r in load_file(DATA_DIR / "general.jsonl") for m in r])
    samples_msgs, counts = calibration_mix(
        synthetic_corrections(SYNTHETIC_CORRECTIONS), identity_rows(cfg), general_rows(cfg),
        cfg.training.mix.identity_ratio, cfg.training.mix.general_ratio, cfg.identity.system, cfg.identity.fill,
        cfg.training.seed)
    encoded, _ = encode_all(tokenizer, both_system_variants(samples_msgs, cfg.identity.system), SEQ_LEN_7B)
    peft_model = sft.with_lora(peft_model.unload(), hyper(cfg, "calibrate"))
    torch.cuda.synchronize()
    start = time.time()
    cal = sft.train(peft_model, tokenizer, encoded, hyper(cfg, "calibrate"))
    torch.cuda.synchronize()
    wall = time.time() - start
    return table(["measure", "value"], [
        ["tokens/s (2048-token sequences)", f"{tps:.0f}"],
        ["4·N limit at 989 TFLOP/s", f"{limit:.0f} tokens/s"],
        ["fraction of the 4·N limit", f"{tps / limit:.1%}"],
        ["peak GPU memory", f"{peak:.1f} GB (target < 24 GB)"],
        [f"calibrate stage: {SYNTHETIC_CORRECTIONS} corrections + replay ({len(encoded)} samples, {cal['steps']} "
         f"optimizer steps, {cal['tokens']} tokens)", f"{wall:.1f} s"]],
        title="GPU, random Qwen2.5-7B",
        text=[f"Random-init Qwen2.5-7B config ({n_params / 1e9:.2f} B parameters), bf16, LoRA r=8 all-linear, "
              f"gradient checkpointing, batch 1 x {SEQ_LEN_7B} tokens. Mix counts: {counts}."])


class _PadTok:
    """The loop only needs pad_token_id for the synthetic full-length sequences."""

    pad_token_id = 0

# ---- loopcord's trainer vs ms-swift (--vs-swift) ------------------------------------------

SWIFT_VENV = ROOT / ".loopcord" / "venvs" / "ms-swift"
QWEN05_RANDOM_DIR = ROOT / ".loopcord" / "bench" / "qwen2.5-0.5b-random"
RESULT_TAG = "TRAIN_BENCH_RESULT "


@dataclass(frozen=True)
class SwiftCase:
    """One model of the side-by-side: where it is, how many optimizer steps, and the ms-swift
    model type / template that render it (both bases use a ChatML chat template)."""

    name: str
    model_dir: Path
    steps: int
    swift_model_type: str
    swift_template: str = "chatml"


@dataclass(frozen=True)
class Yardstick:
    """Tokens in one epoch of the benchmark data, counted once from loopcord's encoding."""

    samples: int
    tokens: int  # non-pad tokens (every token of every sample)
    answer_tokens: int  # tokens the loss is computed on (assistant answers)


def bench_hyper(steps: int):
    """cpu-small's anchor recipe (batch 8 x 1, lr 4e-4, warm-up 5 %, max length 512, LoRA r 8,
    alpha 32, dropout 0.0 on all linear layers, float32) for one epoch of `steps` batches."""
    from model.config import config_from_dict
    from trainer.stages import hyper

    cfg = config_from_dict({"training": {"profile": "cpu-small", "cpu_bf16": "off"}})
    from trainer.stages import training_settings

    hp = hyper(training_settings(cfg), "anchor")
    hp.epochs = 1.0
    return cfg, hp


def bench_rows(steps: int) -> list:
    """The anchor stage's data (identity + general replay with the dataset's answers), every
    row under the identity system prompt (explicit, so no tool injects its own default), half
    identity, half general, shuffled with the run seed: steps x batch rows."""
    import random

    from trainer import datasets as ds
    from trainer.stages import general_rows, identity_rows

    cfg, hp = bench_hyper(steps)
    n = steps * hp.batch_size * hp.grad_accum
    system = cfg.identity.system
    identity = ds.sample_rows(identity_rows(cfg), n // 2, hp.seed)
    general = ds.sample_rows(general_rows(cfg), n - len(identity), hp.seed)
    rows = [ds.with_system(r, system) for r in identity + general]
    random.Random(hp.seed).shuffle(rows)
    return rows


def measure_yardstick(tokenizer, rows: list, max_length: int):
    from trainer.encode import encode_all

    encoded, dropped = encode_all(tokenizer, rows, max_length)
    if dropped:
        raise SystemExit(f"{dropped} benchmark rows lost their answer to max_length {max_length}")
    return encoded, Yardstick(len(encoded), sum(len(e.input_ids) for e in encoded),
                              sum(e.trained_tokens for e in encoded))


# Cores each tool may use (--cores): 1, or 2 — loopcord then trains in two one-thread processes
# (trainer.parallel, as `training.cpu_data_parallel` does on a CPU), ms-swift with two threads.
CORES_ENV = "LOOPCORD_BENCH_CORES"
CORES_TEXT = {1: "one CPU thread each (OMP_NUM_THREADS=1, torch.set_num_threads(1))",
              2: "two cores each: loopcord in two one-thread processes splitting every batch (trainer.parallel, "
                 "what `training.cpu_data_parallel: auto` does here), ms-swift with two threads (OMP_NUM_THREADS=2)"}


def bench_cores() -> int:
    return int(os.environ.get(CORES_ENV, "1"))


def ours_child(model_dir: str, data: str, out_dir: str, steps: int) -> None:
    """One run of loopcord's trainer in this (fresh) process; prints its figures as JSON."""
    import json

    import torch

    from trainer import sft
    from trainer.datasets import load_file
    from trainer.parallel import Helper

    torch.set_num_threads(1)
    helper = Helper(model_dir, 1) if bench_cores() == 2 else None  # loads while this process does
    cfg, hp = bench_hyper(steps)
    model, tokenizer = sft.load_base(model_dir, "cpu")
    encoded, _ = measure_yardstick(tokenizer, load_file(data), hp.max_length)
    peft_model = sft.with_lora(model, hp)
    shard = helper.train_shard(None, hp, encoded) if helper is not None else None
    if helper is not None and shard is None:
        raise SystemExit("the second training process did not start")
    try:
        stats = sft.train(peft_model, tokenizer, encoded, hp, shard=shard)
    finally:
        if shard is not None:
            shard.close()
        if helper is not None:
            helper.stop()
    sft.save_adapter(peft_model, Path(out_dir))
    print(RESULT_TAG + json.dumps({"train_seconds": stats["seconds"], "steps": stats["steps"],
                                   "tokens": stats["tokens"], "final_loss": stats["final_loss"]}), flush=True)


def tool_env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               MODELSCOPE_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    return env


def run_ours(case: SwiftCase, data: Path, out_dir: Path) -> dict:
    import json
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--ours-child", str(case.model_dir), str(data),
           str(out_dir), str(case.steps)]
    start = time.time()
    proc = subprocess.run(cmd, env=tool_env(), capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"loopcord trainer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG))
    res = json.loads(line[len(RESULT_TAG):])
    return {"wall": wall, "train_seconds": res["train_seconds"], "steps": res["steps"],
            "own_loss": res["final_loss"], "adapter": out_dir, "tokens_seen": res["tokens"]}


def swift_command(case: SwiftCase, data: Path, out_dir: Path) -> list[str]:
    """`swift sft` with loopcord's settings spelled out (ms-swift's own defaults differ:
    gradient checkpointing on, weight decay 0.1, a dataloader worker, tensorboard)."""
    _, hp = bench_hyper(case.steps)
    return [
        str(SWIFT_VENV / "bin" / "swift"), "sft",
        "--model", str(case.model_dir), "--model_type", case.swift_model_type, "--template", case.swift_template,
        "--dataset", str(data), "--tuner_type", "lora", "--torch_dtype", "float32",
        "--lora_rank", str(hp.lora_r), "--lora_alpha", str(hp.lora_alpha), "--lora_dropout", str(hp.lora_dropout),
        "--target_modules", "all-linear", "--max_length", str(hp.max_length), "--truncation_strategy", "delete",
        "--per_device_train_batch_size", str(hp.batch_size), "--gradient_accumulation_steps", str(hp.grad_accum),
        "--num_train_epochs", "1", "--learning_rate", str(hp.learning_rate), "--lr_scheduler_type", "cosine",
        "--warmup_ratio", str(hp.warmup_ratio), "--weight_decay", "0", "--max_grad_norm", "1.0",
        "--seed", str(hp.seed), "--data_seed", str(hp.seed), "--gradient_checkpointing", "false",
        "--group_by_length", "true", "--split_dataset_ratio", "0", "--eval_strategy", "no",
        "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", "100000", "--save_only_model", "true", "--report_to", "none",
        "--add_version", "false", "--output_dir", str(out_dir),
    ]


def swift_logs(out_dir: Path) -> list[dict]:
    import json

    path = out_dir / "logging.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def find_adapter(out_dir: Path) -> Path:
    hits = sorted(out_dir.rglob("adapter_config.json"), key=lambda p: p.stat().st_mtime)
    if not hits:
        raise SystemExit(f"ms-swift saved no adapter under {out_dir}")
    return hits[-1].parent


def run_swift(case: SwiftCase, data: Path, out_dir: Path, log: Path) -> dict:
    import subprocess

    cmd = swift_command(case, data, out_dir)
    start = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=tool_env(bench_cores()), stdout=fh, stderr=subprocess.STDOUT,
                              cwd=out_dir.parent)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"swift sft failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    logs = swift_logs(out_dir)
    final = next((r for r in reversed(logs) if "train_runtime" in r), None)
    losses = [r["loss"] for r in logs if "loss" in r]
    if final is None:
        raise SystemExit(f"no train_runtime in {out_dir}/logging.jsonl; see {log}")
    runtime = final["train_runtime"]
    runtime = float(str(runtime).rstrip("s")) if not isinstance(runtime, (int, float)) else runtime
    return {"wall": wall, "train_seconds": float(runtime), "steps": final.get("global_step/max_steps"),
            "own_loss": losses[-1] if losses else float("nan"), "adapter": find_adapter(out_dir)}


SWIFT_YARDSTICK = r"""
import json, sys
from swift.arguments import SftArguments
model, model_type, template, data, max_length, out = sys.argv[1:7]
args = SftArguments(model=model, model_type=model_type, template=template, dataset=[data],
                    max_length=int(max_length), torch_dtype="float32", output_dir=out, report_to=["none"])
t = args.get_template()
t.set_mode("train")
tokens = answer = 0
for line in open(data):
    enc = t.encode(json.loads(line))
    tokens += len(enc["input_ids"])
    answer += sum(1 for x in enc["labels"][1:] if x != -100)
print(json.dumps({"tokens": tokens, "answer_tokens": answer}))
"""


def swift_yardstick(case: SwiftCase, data: Path, tmp: Path) -> dict:
    """ms-swift's own encoding of the benchmark data (its template's tokens and loss labels),
    to check both tools train on the same tokens."""
    import json
    import subprocess

    _, hp = bench_hyper(case.steps)
    cmd = [str(SWIFT_VENV / "bin" / "python"), "-c", SWIFT_YARDSTICK, str(case.model_dir), case.swift_model_type,
           case.swift_template, str(data), str(hp.max_length), str(tmp / "yardstick")]
    proc = subprocess.run(cmd, env=tool_env(), capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def answer_ce(model_dir: Path, adapters: list[Path], encoded: list) -> list[float]:
    """Mean cross-entropy over every answer token of `encoded` (token-weighted, no dropout)
    with each adapter on the base: one function for both tools' adapters."""
    import torch
    from peft import PeftModel

    from trainer import sft
    from trainer.encode import IGNORE_INDEX

    torch.set_num_threads(1)
    base, tokenizer = sft.load_base(model_dir, "cpu")
    out = []
    for path in adapters:
        model = PeftModel.from_pretrained(base, str(path)).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for b in range(0, len(encoded), 8):
                ids, mask, labels = sft.collate(encoded[b : b + 8], tokenizer.pad_token_id, "cpu")
                n = int((labels[:, 1:] != IGNORE_INDEX).sum())
                total += float(sft.answer_loss(model, ids, mask, labels)) * n
                count += n
        out.append(total / count)
        base = model.unload()
    return out


def vs_swift_case(case: SwiftCase, rounds: int, work: Path) -> tuple[list[list], dict]:
    """Alternating runs (ours, swift, swift, ours, ...) of one model; table rows and facts."""
    import json

    from transformers import AutoTokenizer

    from trainer.datasets import load_file

    _, hp = bench_hyper(case.steps)
    rows = bench_rows(case.steps)
    data = work / f"{case.name}.jsonl"
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(str(case.model_dir))
    encoded, stick = measure_yardstick(tokenizer, load_file(data), hp.max_length)
    theirs = swift_yardstick(case, data, work)
    order = []
    for r in range(rounds):
        order += ["ours", "swift"] if r % 2 == 0 else ["swift", "ours"]
    runs: dict[str, list] = {"ours": [], "swift": []}
    for i, tool in enumerate(order):
        out = work / f"{case.name}-{tool}-{i}"
        print(f"[{case.name}] run {i + 1}/{len(order)}: {tool}", flush=True)
        res = run_ours(case, data, out) if tool == "ours" else run_swift(case, data, out, work / f"{out.name}.log")
        print(f"[{case.name}]   train {res['train_seconds']:.1f} s, process {res['wall']:.1f} s, "
              f"own loss {res['own_loss']}", flush=True)
        runs[tool].append(res)
    losses = answer_ce(case.model_dir, [r["adapter"] for t in ("ours", "swift") for r in runs[t]], encoded)
    k = len(runs["ours"])
    for t, ls in (("ours", losses[:k]), ("swift", losses[k:])):
        for r, l in zip(runs[t], ls):
            r["answer_ce"] = l
    out = []
    for t in ("ours", "swift"):
        for r in runs[t]:
            out.append([case.name, "loopcord" if t == "ours" else "ms-swift", f"{r['train_seconds']:.1f}",
                        f"{stick.tokens / r['train_seconds']:.0f}", f"{stick.answer_tokens / r['train_seconds']:.0f}",
                        f"{r['wall']:.1f}", f"{stick.tokens / r['wall']:.0f}", f"{r['answer_ce']:.4f}",
                        f"{r['own_loss']:.4f}"])
    import statistics as st

    def med(t: str, key: str) -> float:
        return st.median(r[key] for r in runs[t])

    facts = {
        "case": case, "yardstick": stick, "swift_yardstick": theirs, "data": data,
        "ratio_train": med("swift", "train_seconds") / med("ours", "train_seconds"),
        "ratio_wall": med("swift", "wall") / med("ours", "wall"),
        "ce_ours": med("ours", "answer_ce"), "ce_swift": med("swift", "answer_ce"),
        "ratios_paired": [s["train_seconds"] / o["train_seconds"] for o, s in zip(runs["ours"], runs["swift"])],
        "ours_tokens_seen": [r["tokens_seen"] for r in runs["ours"]],
    }
    return out, facts


def versions() -> str:
    import subprocess

    script = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
              "('ms-swift', 'torch', 'transformers', 'peft', 'trl', 'accelerate')))")
    theirs = subprocess.run([str(SWIFT_VENV / "bin" / "python"), "-c", script], capture_output=True, text=True)
    import importlib.metadata as m

    ours = ", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "peft"))
    return f"loopcord (system Python): {ours}; ms-swift venv: {theirs.stdout.strip() or theirs.stderr.strip()[-200:]}"


def bench_vs_swift(cases: list[SwiftCase], rounds: int, command: str) -> dict:
    import tempfile

    if not (SWIFT_VENV / "bin" / "swift").exists():
        raise SystemExit(f"ms-swift is not installed at {SWIFT_VENV}: python -m venv {SWIFT_VENV} && "
                         f"{SWIFT_VENV}/bin/pip install ms-swift==4.6.0 torch==2.13.0")
    work = Path(tempfile.mkdtemp(prefix="train-bench-swift-"))
    rows, facts = [], []
    for case in cases:
        t, f = vs_swift_case(case, rounds, work)
        rows += t
        facts.append(f)
    _, hp = bench_hyper(1)
    lines = []
    for f in facts:
        c, y, sy = f["case"], f["yardstick"], f["swift_yardstick"]
        if "error" in sy:
            agree = f": ms-swift's encoding could not be read ({sy['error']})"
        elif sy["tokens"] != y.tokens:
            agree = f"; ms-swift's `{c.swift_template}` template encodes {sy['tokens']} tokens — NOT the same data"
        else:
            extra = sy["answer_tokens"] - y.answer_tokens
            agree = (f"; ms-swift's `{c.swift_template}` template encodes the same {sy['tokens']} tokens and puts its "
                     f"loss on {sy['answer_tokens']}" + (f" ({extra / y.samples:g} more per sample: it also trains "
                                                          "the newline after each answer's end-of-turn token)"
                                                          if extra else ""))
        lines.append(
            f"- **{c.name}** ({c.model_dir}): {y.samples} samples = {c.steps} optimizer steps, {y.tokens} tokens, "
            f"{y.answer_tokens} answer tokens (loopcord's encoding{agree}). "
            f"Ratio ms-swift time / loopcord time (medians): training loop **{f['ratio_train']:.2f}x**, "
            f"whole process {f['ratio_wall']:.2f}x; paired loop ratios "
            f"{', '.join(f'{r:.2f}' for r in f['ratios_paired'])}. Answer CE after training: loopcord "
            f"{f['ce_ours']:.4f}, ms-swift {f['ce_swift']:.4f}. Target (issue 11) >= 1.5x tokens/s at equal loss: "
            f"{'met' if f['ratio_train'] >= 1.5 and f['ce_ours'] <= f['ce_swift'] * 1.01 else 'NOT met'}.")
    settings = (f"Same settings for both: LoRA r {hp.lora_r}, alpha {hp.lora_alpha}, dropout {hp.lora_dropout}, all "
                f"linear layers; float32; batch {hp.batch_size} x accumulation {hp.grad_accum}; 1 epoch; lr "
                f"{hp.learning_rate} with {hp.warmup_ratio:.0%} linear warm-up then cosine; weight decay 0; clip 1.0; "
                f"max length {hp.max_length}; length-grouped batches (ms-swift: `--group_by_length true`); no "
                f"gradient checkpointing; seed 42; {CORES_TEXT[bench_cores()]}; "
                "each run a fresh process, run alternately (ours, swift, swift, ours).")
    return dict(
        text=["Loopcord's trainer (trainer/sft.py) vs `swift sft` on the same LoRA and data.", settings,
              "Data: the anchor stage's rows (identity templates + general replay with the dataset's answers, half "
              "each, every row under the identity system prompt), written as a `messages` JSONL.",
              "Yardstick: tokens are counted once, from loopcord's encoding of that file (non-pad tokens of every "
              "sample; answer tokens = the ones the loss is on), and divided by each tool's training-loop wall time "
              "(loopcord: `sft.train`'s loop; ms-swift: the HF Trainer's `train_runtime`) or by the whole process's "
              "wall time (start-up, model load and data preparation included). Loss: mean cross-entropy over every "
              "answer token of the data with the trained adapter (dropout off), computed by one function "
              "(`sft.answer_loss`) for both tools' adapters; the tools' own last logged step loss is shown too."],
        tables=[table(["model", "trainer", "train loop s", "tokens/s (loop)", "answer tokens/s (loop)", "process s",
                       "tokens/s (process)", "answer CE after", "tool's last logged loss"], rows)],
        notes=[*lines, f"Versions: {versions()}.",
               f"Command: `{command}` (swift command line: "
               f"`{' '.join(swift_command(cases[0], Path('DATA.jsonl'), Path('OUT')))}`)."])


STEP_AB_VARIANTS = (("peft layers, whole rows", False, False), ("fused LoRA, whole rows", True, False),
                    ("fused LoRA, shared prefix once (default)", True, True))


def bench_step_ab(rounds: int, batches_per_round: int) -> dict:
    """One process, one thread: the same batches through each variant in turn, `rounds` times."""
    import contextlib
    import statistics

    import torch

    from trainer import sft
    from trainer.fused_lora import fused_lora

    torch.set_num_threads(1)
    _, hp = bench_hyper(batches_per_round)
    model, tokenizer = sft.load_base(smollm2_dir(), "cpu")
    encoded, _ = measure_yardstick(tokenizer, bench_rows(batches_per_round), hp.max_length)
    model = sft.with_lora(model, hp)
    with torch.no_grad():  # B starts at zero: give it values so every gradient path carries signal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = sft.length_grouped_batches(encoded, hp.batch_size, hp.seed)[:batches_per_round]
    collated = [sft.collate(b, tokenizer.pad_token_id, torch.device("cpu")) for b in batches]
    tokens = sum(int(mask.sum()) for _, mask, _ in collated)

    def run(fused: bool, shared: bool, keep: bool):
        out = []
        with fused_lora(model) if fused else contextlib.nullcontext():
            for ids, mask, labels in collated:
                loss = sft.answer_loss(model, ids, mask, labels, share_prefix=shared)
                loss.backward()
                if keep:
                    out.append((float(loss.detach()), [p.grad.clone() for p in params]))
                for p in params:
                    p.grad = None
        return out

    reference = run(False, False, keep=True)
    worst_loss = worst_grad = 0.0
    for _, fused, shared in STEP_AB_VARIANTS[1:]:
        for (l0, g0), (l1, g1) in zip(reference, run(fused, shared, keep=True)):
            worst_loss = max(worst_loss, abs(l1 - l0) / abs(l0))
            worst_grad = max(worst_grad, max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))
                                             for a, b in zip(g0, g1)))
    times = {name: [] for name, _, _ in STEP_AB_VARIANTS}
    for r in range(rounds):
        order = STEP_AB_VARIANTS if r % 2 == 0 else STEP_AB_VARIANTS[::-1]
        for name, fused, shared in order:
            t = time.perf_counter()
            run(fused, shared, keep=False)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times[STEP_AB_VARIANTS[0][0]])
    rows = []
    for name, _, _ in STEP_AB_VARIANTS:
        med = statistics.median(times[name])
        rows.append([name, f"{med:.2f}", f"{tokens / med:.0f}", f"**{base / med:.2f}x**"])
    prefix = [sft.shared_prefix_length(ids, mask) for ids, mask, _ in collated]
    return dict(
        text=[f"One train step (forward + backward, no optimizer) of SmolLM2-135M-Instruct with the anchor recipe's "
              f"LoRA (r {hp.lora_r}, all linear layers, float32, one thread), over the same {len(collated)} batches "
              f"of {hp.batch_size} rows of the anchor stage's data ({tokens} non-pad tokens; leading tokens common to "
              f"a batch's rows: {min(prefix)}-{max(prefix)}), each variant in turn, order reversed every other round, "
              f"{rounds} rounds, one process."],
        tables=[table(["variant", "median s for the batches", "tokens/s", "speed vs peft layers"], rows)],
        notes=[f"Same arithmetic checked: largest relative difference from the peft-layers variant, loss "
               f"{worst_loss:.1e}, any LoRA gradient (max-abs error over the tensor's max) {worst_grad:.1e}.",
               "Command: `PYTHONPATH=. python benchmarks/train_bench.py --step-ab`."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random-qwen7b", action="store_true", help="also run the 7B-shape GPU benchmark")
    ap.add_argument("--cpu-steps", type=int, default=CPU_STEPS)
    ap.add_argument("--vs-swift", action="store_true",
                    help="only the side-by-side with ms-swift (its venv at .loopcord/venvs/ms-swift)")
    ap.add_argument("--models", default="smollm2,qwen0.5b", help="--vs-swift models: smollm2, qwen0.5b")
    ap.add_argument("--cores", type=int, choices=(1, 2), default=1,
                    help="--vs-swift: cores each tool uses (2: loopcord data parallel, ms-swift two threads)")
    ap.add_argument("--smollm2-steps", type=int, default=20)
    ap.add_argument("--qwen-steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="--vs-swift: runs of each tool per model")
    ap.add_argument("--step-ab", action="store_true",
                    help="only the in-process A/B of one train step: peft layers / fused LoRA / shared prefix")
    ap.add_argument("--ab-rounds", type=int, default=6, help="--step-ab: rounds")
    ap.add_argument("--ab-batches", type=int, default=6, help="--step-ab: batches a round")
    ap.add_argument("--ours-child", nargs=4, metavar=("MODEL", "DATA", "OUT", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ours_child:
        model_dir, data, out, steps = args.ours_child
        ours_child(model_dir, data, out, int(steps))
        return
    if args.step_ab:
        parts = bench_step_ab(args.ab_rounds, args.ab_batches)
        print(preview("train_bench_step_ab", **parts))
        record("train_bench_step_ab", **parts)
        return
    if args.vs_swift:
        os.environ[CORES_ENV] = str(args.cores)  # read here and by the child runs
        known = {"smollm2": SwiftCase("SmolLM2-135M-Instruct", smollm2_dir(), args.smollm2_steps, "llama"),
                 "qwen0.5b": SwiftCase("Qwen2.5-0.5B shape (random)", QWEN05_RANDOM_DIR, args.qwen_steps, "qwen2")}
        # One results file per model, so a model run alone (the 0.5B shape takes long on a
        # shared CPU) does not erase the other's figures.
        for key in [m.strip() for m in args.models.split(",") if m.strip()]:
            command = "PYTHONPATH=. python benchmarks/train_bench.py " + " ".join(sys.argv[1:])
            name = f"train_bench_vs_swift_{key}" + ("_2cores" if args.cores == 2 else "")
            parts = bench_vs_swift([known[key]], args.rounds, command)
            print(preview(name, **parts))
            record(name, **parts)
        return
    tables = [bench_cpu(args.cpu_steps)]
    if args.random_qwen7b:
        tables.append(bench_random_qwen7b())
    else:
        tables.append(table([], [], title="GPU, random Qwen2.5-7B",
                            text=["Not run here (no GPU in this session); run `PYTHONPATH=. python "
                                  "benchmarks/train_bench.py --random-qwen7b` on a CUDA machine."]))
    print(preview("train_bench", tables=tables))
    record("train_bench", tables=tables)


if __name__ == "__main__":
    main()
