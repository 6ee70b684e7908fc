"""A per-slot KV cache, written in place, that drives an unmodified transformers model.

Each layer holds two tensors [rows, kv_heads, capacity, head_dim]; a running
sequence owns one slot (row) for its whole life, so admitting or retiring a
request never copies anyone's cache (gpt-fast's static cache, with one row per
request instead of one batch). Both dimensions are allocated on demand: rows
grow in blocks of `ROW_BLOCK` when a slot beyond them is taken, capacity grows
in `GROW_TOKENS` steps when a sequence gets longer than any before it, and the
engine drops a large cache when it goes idle. So memory
follows the live rows and the longest live context, not the batch limit times
the model's maximum, and a lone request after an idle spell allocates a few rows,
not 32 (first-touch page faults are a visible part of time to first token on
a small VM). `bytes_for(rows, length)` lets the engine keep the cache under a
memory budget before it admits anyone.

`SlotCache` is a transformers `Cache`: the model's attention layers call
`update(keys, values, layer_idx)` and attend over what it returns, under the
4-D boolean mask the runner passes (transformers uses a 4-D mask as given).
Before each forward the runner sets a plan:

- `DecodePlan`: rows 0..n-1 of the batch are slots 0..n-1, one new token each
  at its own position. Keys are written in place with one indexed store and
  attention reads a view `[:n, :, :width]` of the cache: no copy at all.
  Slots that are not decoding (free, or mid-prefill) ride along as dummy rows;
  they write at their own next position, which their next real token
  overwrites, and their outputs are ignored.
- `ChunkPlan`: a left-padded chunk of prompt tokens for any set of slots (or
  single decode tokens for a subset). New keys are written to their slots;
  attention gets the current chunk, preceded by each row's history when some
  row has one (gathered into a fresh tensor: a prefill-sized cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from transformers.cache_utils import Cache

GROW_TOKENS = 64  # capacity grows in multiples of this
ROW_BLOCK = 4  # rows are allocated in multiples of this (a burst of admissions grows them once)


@dataclass(frozen=True)
class DecodePlan:
    rows: int  # batch rows = slots 0..rows-1
    starts: torch.Tensor  # [rows] long: each row's write position
    width: int  # positions attention reads: max(starts) + 1


@dataclass(frozen=True)
class ChunkPlan:
    slots: list[int]  # batch row b writes slot slots[b]
    starts: list[int]  # first position of row b's tokens
    lengths: list[int]  # real (right-aligned) tokens in row b; the rest is left padding
    history: int  # max(starts): history columns in front of the chunk


Plan = Union[DecodePlan, ChunkPlan]


class SlotCache(Cache):
    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str, max_len: int):
        super().__init__(layers=[])
        self.num_layers, self.slots, self.kv_heads, self.head_dim = num_layers, slots, kv_heads, head_dim
        self.dtype, self.device, self.max_len = dtype, device, max_len
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows = 0  # allocated rows (slots 0..rows-1)
        self.max_bytes: Optional[int] = None  # the engine's budget: row rounding stays under it
        self.capacity = 0
        self.plan: Optional[Plan] = None

    @classmethod
    def for_model(cls, config, slots: int, dtype: torch.dtype, device: str, max_len: int) -> "SlotCache":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(text.num_hidden_layers, slots, kv_heads, head_dim, dtype, device, max_len)

    # ---------------- memory ----------------

    def bytes_per_token_row(self) -> int:
        """Bytes one position of one row costs across all layers, keys and values."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def grown(self, rows: int, length: int) -> tuple[int, int]:
        """(rows, capacity) after `reserve(length, rows)`: what the tensors would be, without allocating."""
        cap = self.capacity
        if length > cap:
            want = max(length, cap + cap // 4)
            cap = min(-(-want // GROW_TOKENS) * GROW_TOKENS, max(self.max_len, length))
        new_rows = self.rows
        if rows > self.rows:
            new_rows = min(-(-rows // ROW_BLOCK) * ROW_BLOCK, max(self.slots, rows))
            if self.max_bytes is not None:  # the block rounding never spends budget on rows nobody holds
                new_rows = max(rows, min(new_rows, self.max_bytes // max(cap * self.bytes_per_token_row(), 1)))
        return new_rows, cap

    def bytes_for(self, rows: int, length: int) -> int:
        """Cache bytes once rows 0..rows-1 hold positions 0..length-1 (growth rounding included)."""
        r, cap = self.grown(rows, length)
        return r * cap * self.bytes_per_token_row()

    def reserve(self, length: int, rows: Optional[int] = None) -> None:
        """Make room for positions 0..length-1 in rows 0..rows-1 (grows; existing rows are kept).

        Rows grow to a multiple of ROW_BLOCK (within `max_bytes`), capacity by at least a quarter to a
        multiple of GROW_TOKENS, one layer at a time so the transient extra memory is one layer's worth,
        not a second copy.
        """
        rows = self.rows if rows is None else rows
        new_rows, cap = self.grown(rows, length)
        if new_rows == self.rows and cap == self.capacity:
            return
        shape = (new_rows, self.kv_heads, cap, self.head_dim)
        for store in (self.k, self.v):
            for i in range(self.num_layers):
                # zeros, not empty: masked positions are still multiplied (by 0) in attention, and 0 * NaN is NaN
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    new[: self.rows, :, : self.capacity].copy_(store[i])
                    store[i] = new
                else:
                    store.append(new)
        self.rows, self.capacity = new_rows, cap

    def release_memory(self) -> None:
        self.k, self.v, self.rows, self.capacity = [], [], 0, 0

    def clear_slot(self, slot: int) -> None:
        """Zero one slot (after a row produced non-finite values, so its next owner starts clean)."""
        if slot < self.rows:
            for t in self.k + self.v:
                t[slot].zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # ---------------- the transformers Cache interface ----------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        plan = self.plan
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        if isinstance(plan, DecodePlan):
            rows = torch.arange(plan.rows, device=kc.device)
            kc[rows, :, plan.starts] = key_states[:, :, 0]
            vc[rows, :, plan.starts] = value_states[:, :, 0]
            return kc[: plan.rows, :, : plan.width], vc[: plan.rows, :, : plan.width]
        width = key_states.shape[2]
        for b, (slot, start, n) in enumerate(zip(plan.slots, plan.starts, plan.lengths)):
            kc[slot, :, start:start + n] = key_states[b, :, width - n:]
            vc[slot, :, start:start + n] = value_states[b, :, width - n:]
        if plan.history == 0:
            return key_states, value_states
        keys = _with_history(kc, key_states, plan)
        values = _with_history(vc, value_states, plan)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly (per row)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.num_layers


def _with_history(cache: torch.Tensor, current: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """[B, H, history + T, D]: row b's history right-aligned before the current chunk."""
    b, h, t, d = current.shape
    out = current.new_zeros((b, h, plan.history + t, d))
    out[:, :, plan.history:] = current
    for row, (slot, start) in enumerate(zip(plan.slots, plan.starts)):
        if start:
            out[row, :, plan.history - start:plan.history] = cache[slot, :, :start]
    return out


def decode_mask(starts: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, 1, 1, width] bool: row b sees positions 0..starts[b]."""
    cols = torch.arange(width, device=starts.device)
    return (cols[None, :] <= starts[:, None])[:, None, None, :]


def chunk_mask(plan: ChunkPlan, width: int, device) -> torch.Tensor:
    """[B, 1, T, history + T] bool for a left-padded chunk after right-aligned histories.

    A real query sees its row's history and the real chunk tokens up to itself;
    a padding query sees only itself, so no row of the softmax is empty (NaN).
    """
    starts = torch.tensor(plan.starts, device=device)
    lengths = torch.tensor(plan.lengths, device=device)
    t = torch.arange(width, device=device)
    hist = torch.arange(plan.history, device=device)
    sees_history = (hist[None, :] >= plan.history - starts[:, None])[:, None, :].expand(-1, width, -1)
    first_real = (width - lengths)[:, None, None]
    causal = t[None, None, :] <= t[None, :, None]
    sees_chunk = (causal & (t[None, None, :] >= first_real)) | torch.eye(width, dtype=torch.bool, device=device)
    is_real = (t[None, :, None] >= first_real)
    mask = torch.cat([sees_history & is_real, sees_chunk], dim=-1)
    return mask[:, None]
