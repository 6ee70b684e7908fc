"""LoRA supervised fine-tuning: load the base, attach or continue an adapter, train, save.

The torch edge of the trainer. One loop for every stage: length-grouped
batches (padding waste stays small), a batch's common leading tokens (the system
prompt) run once for all its rows, gradient accumulation, linear warm-up
then cosine decay (ms-swift's default schedule), gradient clipping, bf16
weights on GPU, optional gradient checkpointing. The adapter is saved with
PEFT's own save_pretrained, so the directory is a standard PEFT adapter.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from model.loading import load_model
from trainer.encode import IGNORE_INDEX, Encoded
from trainer.shard import Shard

MAX_GRAD_NORM = 1.0


@dataclass
class Hyper:
    learning_rate: float
    epochs: float
    batch_size: int
    grad_accum: int
    warmup_ratio: float
    max_length: int
    seed: int
    gradient_checkpointing: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: str
    cpu_bf16: bool = False  # bf16 autocast on a CPU with native bf16 (weights stay float32)
    distill_replay: bool = False  # base-answered replay rows learn the base's distribution (KL)
    fused_lora: bool = True  # LoRA layers as one autograd node each where exact (trainer.fused_lora)
    shared_prefix: bool = True  # a batch's common leading tokens run once where exact (body_hidden)

    def as_dict(self) -> dict:
        return asdict(self)


def load_base(path: str | Path, device: str = "auto"):
    """Base model + tokenizer through the one loader the worker uses (bf16 weights on a GPU,
    float32 on a CPU, where bf16 runs as autocast instead: see Hyper.cpu_bf16)."""
    model, tokenizer, _, _ = load_model(path, device, "auto")
    return model, tokenizer


def with_lora(model, hp: Hyper, adapter: Optional[str | Path] = None):
    """A fresh LoRA on all linear layers, or continue training the adapter at `adapter`."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(hp.seed)  # a fresh LoRA's A matrices are random: same seed, same run
    if adapter is not None:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    target = hp.target_modules
    config = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=target if target == "all-linear" else [t.strip() for t in target.split(",")],
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, config)


def length_grouped_batches(samples: list[Encoded], batch_size: int, seed: int) -> list[list[Encoded]]:
    """One epoch of batches of similar length (transformers' LengthGroupedSampler: random
    mega-batches of 50 batches, sorted by length inside), so padding waste stays small."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    order = list(LengthGroupedSampler(batch_size, lengths=[len(e.input_ids) for e in samples], generator=g))
    return [[samples[i] for i in order[b : b + batch_size]] for b in range(0, len(order), batch_size)]


def collate(batch: list[Encoded], pad_id: int, device):
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def answer_token_count(e: Encoded) -> int:
    """Tokens `answer_loss` scores in this sample (labels predicted from a previous token)."""
    return sum(1 for label in e.labels[1:] if label != IGNORE_INDEX)


def distill_rows(batch: list[Encoded], device):
    """Which rows of a collated batch carry the base model's own answers (Encoded.distill)."""
    import torch

    return torch.tensor([e.distill for e in batch], dtype=torch.bool, device=device)


# A batch's rows share their leading tokens (the identity system prompt: 33 of SmolLM2's
# ~60 tokens a row in the anchor stage) when at least this many are common to all of them.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(ids, mask) -> int:
    """How many leading tokens every row of a right-padded batch has in common, short of
    each row's last token (every row keeps one of its own); 0 below MIN_SHARED_PREFIX."""
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0) & (mask == 1).all(dim=0)
    differs = (~same).nonzero()
    n = int(differs[0]) if len(differs) else ids.shape[1]
    n = min(n, int(mask.sum(dim=1).min()) - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def _exact_to_share(body) -> bool:
    """Sharing the prefix is the same arithmetic as the plain forward only without dropout
    (one prefix pass would give every row the same dropout mask) and without gradient
    checkpointing (which turns the key/value cache off)."""
    import torch

    if not body.training:
        return True
    if getattr(body, "gradient_checkpointing", False):
        return False
    if float(getattr(body.config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in body.modules())


def body_hidden(body, ids, mask, share: bool = True):
    """The decoder's last hidden states [rows, length, hidden] for a right-padded batch.

    Where every row starts with the same tokens, those are run once (one row) and their
    keys and values handed to the rest of each row as a cache: the rows' own tokens attend
    to them exactly as in one forward of the whole batch, and the backward pass sums each
    row's gradient into the one shared pass. Same loss and gradients; the shared tokens'
    arithmetic is done once instead of once a row. `share=False`: always the plain forward."""
    n = shared_prefix_length(ids, mask) if share and _exact_to_share(body) else 0
    if n == 0:
        return body(input_ids=ids, attention_mask=mask).last_hidden_state
    import torch

    from model.runner import cache_argument  # imports torch and transformers

    rows, name = ids.shape[0], cache_argument(body)
    head = body(input_ids=ids[:1, :n], attention_mask=mask[:1, :n], use_cache=True)
    cache = head.get(name)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):  # a model that keeps no usable cache
        return body(input_ids=ids, attention_mask=mask).last_hidden_state
    cache.batch_repeat_interleave(rows)
    tail = body(input_ids=ids[:, n:], attention_mask=mask, use_cache=True, **{name: cache})
    return torch.cat([head.last_hidden_state.expand(rows, -1, -1), tail.last_hidden_state], dim=1)


def answer_loss(model, ids, mask, labels, reduction: str = "mean", distill_rows=None, share_prefix: bool = True):
    """Cross-entropy (mean, or "sum") over the answer tokens, with the output layer applied
    only there.

    Labels mask everything but the assistant's answers, a fraction of each sample; the
    output layer is the biggest matrix of a small model (SmolLM2: 49k x 576), so computing
    logits for every position wastes most of its cost. Same value as the model's own
    loss (`model(..., labels=labels).loss`), which stays the fallback for a model without
    the usual `.model` / `.lm_head` split.

    `distill_rows` (a bool per row; PeftModel only): those rows' answers are the base
    model's own, and their tokens count KL(base || model) instead of cross-entropy: the
    base's distribution comes from the same weights with the adapter switched off."""
    import torch
    import torch.nn.functional as F

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(causal, "model", None), getattr(causal, "lm_head", None)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if body is None or head is None:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss * keep.sum() if reduction == "sum" else loss
    hidden = body_hidden(body, ids, mask, share_prefix)[:, :-1]
    if distill_rows is None or not bool(distill_rows.any()) or not hasattr(model, "disable_adapter"):
        logits = head(hidden[keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)
    as_answer = keep & ~distill_rows[:, None]
    as_base = keep & distill_rows[:, None]
    total = F.cross_entropy(head(hidden[as_answer]).float(), targets[as_answer], reduction="sum")
    with torch.no_grad(), model.disable_adapter():
        base_hidden = body_hidden(body, ids[distill_rows], mask[distill_rows], share_prefix)[:, :-1]
        base_logp = F.log_softmax(head(base_hidden[as_base[distill_rows]]).float(), dim=-1)
    logp = F.log_softmax(head(hidden[as_base]).float(), dim=-1)
    total = total + F.kl_div(logp, base_logp, log_target=True, reduction="sum")
    return total if reduction == "sum" else total / keep.sum().clamp(min=1)


def plan_steps(n_samples: int, hp: Hyper) -> int:
    """Optimizer steps for `epochs` passes (fractional epochs allowed)."""
    micro = math.ceil(n_samples * hp.epochs / hp.batch_size)
    return max(1, math.ceil(micro / hp.grad_accum))


def epochs_for_steps(steps: int, n_samples: int, hp: Hyper) -> float:
    """The (fractional) epochs that make `plan_steps` come to `steps`."""
    return steps * hp.batch_size * hp.grad_accum / max(1, n_samples)


def train(
    model,
    tokenizer,
    samples: list[Encoded],
    hp: Hyper,
    on_step: Optional[Callable[[int, int, float, int], None]] = None,
    shard=None,
) -> dict:
    """Train the LoRA parameters of `model` in place; returns run statistics.

    on_step(step, total, loss, tokens) after each optimizer step. `shard` (trainer.shard):
    this process's rows of every batch and the gradient all-reduce when two processes
    train together; default, the whole batch here. Each micro-batch's loss is the sum over
    this process's answer tokens divided by the whole batch's answer tokens, so the summed
    gradients are those of the batch's mean loss whichever way the rows are split.
    """
    import torch

    from trainer.fused_lora import fused_lora  # imports torch

    if not samples:
        raise ValueError("no training samples")
    from transformers import get_cosine_schedule_with_warmup

    device = next(model.parameters()).device
    torch.manual_seed(hp.seed)
    if hp.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    shard = shard or Shard()
    shard.start(params)
    opt = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=0.0)
    total = plan_steps(len(samples), hp)
    # Linear warm-up then cosine decay to zero (ms-swift's default). One warm-up step at
    # least, starting above zero, so a short calibrate run does not waste its first step.
    warmup = max(1, math.ceil(total * hp.warmup_ratio))
    schedule = get_cosine_schedule_with_warmup(opt, warmup, total)
    for g in opt.param_groups:
        g["lr"] = hp.learning_rate / (warmup + 1)
    micro_needed = total * hp.grad_accum
    pad = tokenizer.pad_token_id
    model.train()
    start, tokens_seen, step, micro = time.time(), 0, 0, 0
    window_loss, window_tokens, last_loss = 0.0, 0, float("nan")
    batches: list = []
    epoch = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with fused_lora(model) if hp.fused_lora else contextlib.nullcontext():
        while step < total:
            if not batches:
                batches = length_grouped_batches(samples, hp.batch_size, hp.seed + epoch)[::-1]
                epoch += 1
            batch = batches.pop()
            answer_tokens = sum(answer_token_count(e) for e in batch)
            mine = shard.rows(batch)
            if mine:
                ids, mask, labels = collate(mine, pad, device)
                rows = distill_rows(mine, device) if hp.distill_replay else None
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=hp.cpu_bf16 and device.type == "cpu"):
                    loss = answer_loss(model, ids, mask, labels, reduction="sum", distill_rows=rows,
                                       share_prefix=hp.shared_prefix)
                    loss = loss / max(1, answer_tokens)
                (loss / hp.grad_accum).backward()
                window_loss += float(loss.detach())
                window_tokens += int(mask.sum())
            micro += 1
            if micro % hp.grad_accum == 0 or micro == micro_needed:
                window_loss, window_tokens = shard.reduce(params, [window_loss, float(window_tokens)])
                window_tokens = int(window_tokens)
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
                schedule.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                last_loss = window_loss / hp.grad_accum
                tokens_seen += window_tokens
                if on_step:
                    on_step(step, total, last_loss, window_tokens)
                window_loss, window_tokens = 0.0, 0
    model.eval()
    seconds = time.time() - start
    stats = {
        "steps": total,
        "final_loss": round(last_loss, 5),
        "tokens": tokens_seen,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens_seen / max(seconds, 1e-9), 1),
        "device": str(device),
    }
    if device.type == "cuda":
        stats["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return stats


def save_adapter(model, out_dir: Path) -> None:
    """PEFT's standard adapter files (adapter_config.json + adapter_model.safetensors)."""
    model.save_pretrained(str(out_dir), safe_serialization=True)


def lora_state(model) -> dict:
    """A copy of the model's LoRA tensors (PEFT's saved keys): what blend_with blends from."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def blend_with(model, start: dict, keep: float) -> None:
    """Set the trained LoRA to start + keep x (trained - start), tensor by tensor, `start`
    being lora_state() of the adapter this training continued (taken before it trained)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    trained = get_peft_model_state_dict(model)  # set_ copies the blended values in
    set_peft_model_state_dict(model, {k: start[k] + keep * (v.detach() - start[k]) for k, v in trained.items()})
