"""The model runner: turns a set of sequences into one forward pass and its next-token logits.

Two kinds of step, both through the unmodified transformers model with a
`SlotCache`:

- `decode`: every slot 0..n-1 feeds one token (its last sampled one) at its own
  position; the cache is written in place and read as a view.
- `chunk`: a left-padded batch of prompt chunks (or, as the isolation fallback,
  decode tokens of a few sequences) for any slots; every row's last real token
  is in the last column, so one column of logits is computed.

Per-row LoRA adapters go through peft's mixed-batch forward (`adapter_names`);
a batch on one adapter runs as a plain forward with that adapter active.

A decode step whose rows all use one adapter (or none), and prompt chunks on
one adapter (or none), run through `fast_decode.FastDecode` instead where it covers the model
(Llama, Qwen2 with plain LoRA): the same computation on the same modules without
transformers' per-step bookkeeping.
"""

from __future__ import annotations

from typing import Optional

import torch

from model.fast_decode import FastDecode
from model.kv_cache import ChunkPlan, DecodePlan, SlotCache, chunk_mask, decode_mask


def cache_argument(model) -> str:
    """The forward argument that takes the KV cache: transformers 5.x renamed
    `past_key_values` to `cache` (the old name warns, and goes in 5.40); 4.x knows only it."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
MIXED_ADAPTERS = "__mixed__"  # runner state: rows use different adapters


class Runner:
    def __init__(self, model, device: str, pad_id: int, max_slots: int, max_len: int, fast_decode: bool = True):
        self.model = model  # the base model, or the PeftModel wrapping it once an adapter is loaded
        self.device = device
        self.pad_id = pad_id
        self.max_slots = max_slots
        self.max_len = max_len
        self.peft = False
        self._active: Optional[str] = None  # which adapter state the peft layers are set to
        self.cache: Optional[SlotCache] = None
        self._cache_kw = cache_argument(model)
        self.fast = FastDecode.build(model) if fast_decode else None
        self._fast_covers: dict = {}  # (adapter name, loaded adapters) -> whether FastDecode runs it

    # ---------------- adapters ----------------

    def forget_adapter_state(self) -> None:
        """peft's active adapter changed under us (load/delete): re-select before the next forward."""
        self._active = None

    def _adapter_kwargs(self, names: list[Optional[str]]) -> dict:
        """Forward kwargs for these rows' adapters (None = base)."""
        if not self.peft:
            return {}
        names = [n or BASE_ADAPTER for n in names]
        state = names[0] if len(set(names)) == 1 else MIXED_ADAPTERS
        if state != self._active:
            tuner = self.model.base_model
            if state == BASE_ADAPTER:
                tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()
                if state != MIXED_ADAPTERS:
                    tuner.set_adapter(state, inference_mode=True)
            self._active = state
        return {"adapter_names": names} if state == MIXED_ADAPTERS else {}

    # ---------------- cache ----------------

    def _config(self):
        return self.model.get_base_model().config if self.peft else self.model.config

    def empty_cache(self) -> SlotCache:
        """The cache object (no tensors allocated until something reserves room)."""
        if self.cache is None:
            dtype = next(self.model.parameters()).dtype
            self.cache = SlotCache.for_model(self._config(), self.max_slots, dtype, self.device, self.max_len)
        return self.cache

    def cache_for(self, length: int, rows: int) -> SlotCache:
        """The cache, with room for positions 0..length-1 in slots 0..rows-1."""
        cache = self.empty_cache()
        cache.reserve(length, rows)
        return cache

    def cache_bytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0

    def release_cache(self) -> None:
        if self.cache is not None:
            self.cache.release_memory()

    # ---------------- steps ----------------

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 names: list[Optional[str]]) -> torch.Tensor:
        kwargs = self._adapter_kwargs(names)
        kwargs[self._cache_kw] = self.cache
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **kwargs)
        self.cache.plan = None
        return out.logits[:, -1, :]

    def _fast_for(self, names: list[Optional[str]]) -> Optional[tuple[FastDecode, Optional[str]]]:
        """(FastDecode, the one adapter) when it runs a decode step of rows on these adapters."""
        if self.fast is None or len(set(names)) != 1:
            return None
        if not self.peft and hasattr(self.model, "peft_config"):
            return None  # a PeftModel used as it is (trainer.generate): its adapter state is its caller's
        name = names[0] if self.peft else None
        if name is not None and name not in self.model.peft_config:
            return None  # transformers says what is wrong
        key = (name, tuple(self.model.peft_config) if self.peft else ())
        if key not in self._fast_covers:
            if any(k[1] != key[1] for k in self._fast_covers):
                self._fast_covers = {}  # adapters were loaded or deleted since: ask again
            self._fast_covers[key] = self.fast.covers(self.model, name)
        return (self.fast, name) if self._fast_covers[key] else None

    def decode(self, tokens: torch.Tensor, starts: list[int], names: list[Optional[str]]) -> torch.Tensor:
        """Logits [n, V] for slots 0..n-1 each feeding tokens[i] at position starts[i]."""
        n = len(starts)
        width = max(starts) + 1
        cache = self.cache_for(width, n)
        pos = torch.tensor(starts, device=self.device)
        fast = self._fast_for(names[:n])
        if fast is not None:
            step, name = fast
            return step.decode(self.model, cache, tokens[:n].to(self.device), pos, width, name,
                               ragged=min(starts) != width - 1)
        cache.plan = DecodePlan(n, pos, width)
        return self._forward(tokens[:n, None].to(self.device), pos[:, None], decode_mask(pos, width), names)

    def chunk(self, slots: list[int], starts: list[int], pieces: list[list[int]],
              names: list[Optional[str]]) -> torch.Tensor:
        """Logits [B, V] at the last token of each row; row b feeds pieces[b] from starts[b] in slot slots[b]."""
        width = max(len(p) for p in pieces)
        cache = self.cache_for(max(s + len(p) for s, p in zip(starts, pieces)), max(slots) + 1)
        fast = self._fast_for(names)
        if fast is not None:  # the lean loop: the chunks' tokens as one batch, no padding or 4-D mask
            step, name = fast
            return step.prefill(self.model, cache, list(slots), [torch.tensor(p, device=self.device) for p in pieces],
                                list(starts), name)
        ids = torch.full((len(pieces), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(pieces), width), dtype=torch.long)
        for b, (start, piece) in enumerate(zip(starts, pieces)):
            ids[b, width - len(piece):] = torch.tensor(piece)
            positions[b, width - len(piece):] = torch.arange(start, start + len(piece))
        plan = ChunkPlan(list(slots), list(starts), [len(p) for p in pieces], max(starts))
        cache.plan = plan
        mask = chunk_mask(plan, width, self.device)
        return self._forward(ids.to(self.device), positions.to(self.device), mask, names)
