"""Random tiny Llama and Qwen2 models and the in-process engine around them, for the engine,
fast-decode, fused-LoRA, shared-prefix and bf16-kernel tests (their `tokenizer` fixture is in
tests/conftest.py)."""

from __future__ import annotations

import threading
import time

import torch

from devkit.tiny_model import build_model, build_tokenizer
from model.adapters import AdapterTable
from model.engine import Engine, Sequence
from model.metrics import WorkerMetrics

TEXTS = ["hello world, how are you today?", "the quick brown fox jumps over the lazy dog",
         "numbers: 1 2 3 4 5 6 7 8 9 10", "你好，世界"] * 4
TIMEOUT_S = 120


def engine_tokenizer():
    """A small ChatML tokenizer (the conftest's `tokenizer` fixture)."""
    return build_tokenizer(TEXTS, vocab_size=400)


def random_llama(tokenizer, seed=0):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return model


def random_qwen2(tokenizer, seed=0):
    return build_model(tokenizer, seed=seed, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def sharpen(model):
    """Random init gives near-flat logits, where float noise could flip a greedy tie; scale them up."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    return model.eval()


ARCHS = {"llama": random_llama, "qwen2": random_qwen2}


def make_engine(model, tokenizer, adapters=None, max_batch_size=8):
    eos = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    engine = Engine(model, tokenizer, eos, "cpu", max_batch_size, 64, adapters or AdapterTable(), WorkerMetrics())
    engine.start()
    return engine


class Collector:
    """A request's emit callback: records events, signals when it ends."""

    def __init__(self):
        self.events: list[tuple] = []
        self.ended = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event[0] in ("done", "error"):
            self.ended.set()

    @property
    def outcome(self):
        return self.events[-1][0] if self.ended.is_set() else None


def run(engine, seqs):
    for seq in seqs:
        engine.submit(seq)
    for seq in seqs:
        assert seq.emit.ended.wait(TIMEOUT_S), "request never finished"
    return seqs


def settled(engine) -> bool:
    """Wait until the engine has retired every sequence (it retires at the end of a step)."""
    deadline = time.monotonic() + TIMEOUT_S
    while engine.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.running() == 0


def seq(ids, max_tokens=12, **kw):
    return Sequence(prompt_ids=list(ids), max_tokens=max_tokens, emit=Collector(), ignore_eos=True,
                    temperature=kw.pop("temperature", 0.0), **kw)


def prompts(tokenizer):
    texts = ["hello", "the quick brown fox jumps over the lazy dog and more words follow here",
             "numbers: 1 2 3", "你好，世界 hello world how are you today"]
    return [tokenizer(t)["input_ids"] for t in texts]


def reference(model, ids, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def greedy_through_eos(model, ids, n):
    """n greedy tokens, each the argmax of a full forward, EOS allowed (as `ignore_eos` serves:
    `generate`'s min_new_tokens would forbid EOS instead)."""
    out = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]
