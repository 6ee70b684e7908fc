"""The test fixture model: a tiny (~1M-parameter) Qwen2-architecture model.

It keeps the unit and end-to-end tests fast; the product's embedded default is
SmolLM2-135M-Instruct (model.loading). Built from the project's data: a
byte-level BPE tokenizer with Qwen's special tokens and chat template, and a
small Qwen2ForCausalLM trained briefly on the general instruction set so it has
some "general ability" that forgetting can be measured against. It is saved in
the standard Hugging Face layout, so the worker and trainer load it through
exactly the code path that loads a real model.
The tests' training recipe for it is in devkit/tiny_profile.py.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

# Qwen2.5-Instruct's chat template (tool branches omitted): with no system
# message it injects Qwen's own identity, which identity training must overcome.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEMO_VOCAB_SIZE = 3000
# Small enough to train in CPU minutes, big enough to memorise a few hundred answers.
DEMO_DIMS = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = DEMO_VOCAB_SIZE):
    """Train a byte-level BPE tokenizer (as Qwen's) on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=DEMO_DIMS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0, **dims):
    """A randomly initialised Qwen2ForCausalLM sized by DEMO_DIMS (overridable)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        **{**DEMO_DIMS, **dims},
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False
    )
    return model


def chat_texts(rows: Sequence[dict], tokenizer, system: Optional[str]) -> list[str]:
    """Render `messages` rows through the chat template (optionally with a system prompt)."""
    out = []
    for row in rows:
        msgs = [m for m in row["messages"] if m["role"] != "system"]
        if system is not None:
            msgs = [{"role": "system", "content": system}] + msgs
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return out


def pretrain(
    model,
    tokenizer,
    texts: Sequence[str],
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> float:
    """Plain causal-LM training on whole rendered conversations; returns last loss."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:512] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    pad = tokenizer.pad_token_id
    model.train()
    loss_value = float("nan")
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            order = list(range(len(encoded)))
            rng.shuffle(order)
        batch = [encoded[order.pop()] for _ in range(min(batch_size, len(encoded)))]
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
            labels[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if on_step:
            on_step(step, loss_value)
    model.eval()
    return loss_value


def build_demo_base(
    out_dir: str | Path,
    rows: Sequence[dict],
    steps: int = 1000,
    tokenizer_texts: Optional[Iterable[str]] = None,
    seed: int = 0,
    on_step: Optional[Callable[[int, float], None]] = None,
    **dims,
) -> Path:
    """Build, pretrain and save the demo base in HF layout; returns its directory.

    `rows` are `messages` rows (general instruction data). They are rendered both
    with no system prompt (Qwen's default is injected) and as bare text, so the
    model learns the chat format and the answers.
    """
    out = Path(out_dir)
    corpus = [m["content"] for r in rows for m in r["messages"]]
    tokenizer = build_tokenizer(list(tokenizer_texts or []) + corpus)
    model = build_model(tokenizer, seed=seed, **dims)
    start = time.time()
    loss = pretrain(model, tokenizer, chat_texts(rows, tokenizer, None), steps, seed=seed, on_step=on_step)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "loopcord_demo.json").write_text(
        json.dumps({"steps": steps, "final_loss": loss, "seconds": round(time.time() - start, 1), "rows": len(rows)})
    )
    return out


DATA_DIR = Path(__file__).resolve().parent.parent / "data"
FIXTURE_DATA_DIR = Path(__file__).resolve().parent / "data"
GENERAL_TRAIN_FILE = "general.jsonl"


def read_messages_jsonl(path: Path) -> list[dict]:
    """Minimal reader for the shipped `messages` JSONL files."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


BASE_IDENTITY_FILE = "base_identity.jsonl"


def _default_identity_fill(text: str) -> str:
    """Fill placeholders with the default identity, for the tokenizer's vocabulary only."""
    try:
        from model.config import IdentityConfig
    except ImportError:
        return text
    return IdentityConfig().fill(text)


def build_default(out_dir: str | Path, steps: int = 1000, data_dir: Path = DATA_DIR, **kw) -> Path:
    """The demo base trained on the shipped general instruction set.

    Like Qwen2.5-Instruct, it also learns to call itself Qwen (base_identity.jsonl),
    so identity training has something real to overwrite. The identity templates
    only feed the tokenizer (filled with the default name, so it is one token as
    a real vocabulary would have it); the base never trains on them.
    """
    rows = read_messages_jsonl(Path(data_dir) / GENERAL_TRAIN_FILE)
    base_identity = FIXTURE_DATA_DIR / BASE_IDENTITY_FILE
    if base_identity.exists():
        rows += read_messages_jsonl(base_identity)
    extra = []
    for name in ("identity.jsonl", "identity_eval.jsonl", "general_eval.jsonl"):
        f = Path(data_dir) / name
        if f.exists():
            extra += [_default_identity_fill(m["content"]) for r in read_messages_jsonl(f) for m in r["messages"]]
    return build_demo_base(out_dir, rows, steps=steps, tokenizer_texts=extra, **kw)

