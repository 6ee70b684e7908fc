"""Training throughput: tokens/s and peak memory of a LoRA stage.

  PYTHONPATH=. python benchmarks/train_bench.py                 # tiny model on CPU (always)
  PYTHONPATH=. python benchmarks/train_bench.py --random-qwen7b # GPU: real Qwen2.5-7B shape

The 7B path builds a randomly initialised model with the real Qwen2.5-7B
config in bf16 on CUDA (speed does not depend on weight values), LoRA r=8 on
all linear layers, gradient checkpointing, max length 2048, and reports
tokens/s as a fraction of the 4·N FLOPs-per-token limit (N ≈ 7.07e9 parameters;
H100 bf16 dense ≈ 989 TFLOP/s), peak memory, and the wall time of a calibrate
stage on 100 synthetic corrections plus identity/general replay (the trainer's
own mix and loop, seed hyperparameters). Figures go to benchmarks/RESULTS.md
(section train_bench).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402

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


def bench_cpu(steps: int) -> str:
    """A generalize-like stage on the tiny demo model (random weights: speed only)."""
    import torch

    from model.config import config_from_dict
    from trainer import sft
    from tests.tiny_model import build_model, build_tokenizer
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
        rows.append(f"| tiny Qwen2 (CPU) | {batch_size} x {grad_accum} | {stats['steps']} | {stats['tokens']} | "
                    f"{stats['tokens_per_s']:.0f} | {stats['seconds']:.1f} | {peak_rss_gb():.2f} (RSS) |")
    head = ("| model | batch x accum | optimizer steps | tokens | tokens/s | seconds | peak memory GB |\n"
            "|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows)


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


def bench_random_qwen7b() -> str:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from model.config import config_from_dict
    from trainer import sft
    from trainer.corrections import calibration_mix
    from trainer.datasets import DATA_DIR, both_system_variants, load_file
    from tests.tiny_model import build_tokenizer
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
    return (
        f"Random-init Qwen2.5-7B config ({n_params / 1e9:.2f} B parameters), bf16, LoRA r=8 all-linear, "
        f"gradient checkpointing, batch 1 x {SEQ_LEN_7B} tokens.\n\n"
        "| measure | value |\n|---|---|\n"
        f"| tokens/s (2048-token sequences) | {tps:.0f} |\n"
        f"| 4·N limit at 989 TFLOP/s | {limit:.0f} tokens/s |\n"
        f"| fraction of the 4·N limit | {tps / limit:.1%} |\n"
        f"| peak GPU memory | {peak:.1f} GB (target < 24 GB) |\n"
        f"| calibrate stage: {SYNTHETIC_CORRECTIONS} corrections + replay "
        f"({len(encoded)} samples, {cal['steps']} optimizer steps, {cal['tokens']} tokens) | {wall:.1f} s |\n"
        f"\nMix counts: {counts}."
    )


class _PadTok:
    """The loop only needs pad_token_id for the synthetic full-length sequences."""

    pad_token_id = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random-qwen7b", action="store_true", help="also run the 7B-shape GPU benchmark")
    ap.add_argument("--cpu-steps", type=int, default=CPU_STEPS)
    args = ap.parse_args()
    body = "### CPU, tiny model\n\n" + bench_cpu(args.cpu_steps)
    if args.random_qwen7b:
        body += "\n\n### GPU, random Qwen2.5-7B\n\n" + bench_random_qwen7b()
    else:
        body += ("\n\n### GPU, random Qwen2.5-7B\n\nNot run here (no GPU in this session); "
                 "run `PYTHONPATH=. python benchmarks/train_bench.py --random-qwen7b` on a CUDA machine.")
    print(body)
    write_section("train_bench", body)


if __name__ == "__main__":
    main()
