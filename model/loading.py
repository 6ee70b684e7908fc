"""Load the base model and tokenizer the way a real Qwen2.5 checkpoint loads.

Device and dtype follow `worker.device` / `worker.dtype` ("auto": bf16 on a
GPU, float32 on CPU, where bf16 matmuls are slow and imprecise). Everything
here runs once at start-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("loopcord.worker")

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


class LoadError(Exception):
    """The base model cannot be loaded; the message says what to fix."""


@dataclass
class LoadedBase:
    model: object  # transformers PreTrainedModel (eval mode, on device)
    tokenizer: object
    device: str
    dtype: str
    eos_ids: set[int]
    max_context: int


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"worker.device is {requested!r} but no CUDA GPU is available (use 'cpu' or 'auto')")
    return requested


def resolve_dtype(requested: str, device: str):
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, DTYPES[requested])


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a turn: generation_config's list, the config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def load_base(path: str, device: str = "auto", dtype: str = "auto", max_context: int | None = None,
              cpu_threads: int | None = None) -> LoadedBase:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).exists():
        raise LoadError(f"base model {path!r} does not exist (set model.base or pass --model)")
    dev = resolve_device(device)
    if dev == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot load base model from {path!r}: {exc}") from None
    if tokenizer.chat_template is None:
        raise LoadError(f"{path!r}: the tokenizer has no chat template (an -Instruct checkpoint is needed)")
    model.to(dev).eval()
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=str(torch_dtype).replace("torch.", ""),
        eos_ids=eos_token_ids(model, tokenizer),
        max_context=min(max_context, limit) if max_context else limit,
    )
