"""Reuse of prompt prefixes' keys and values across requests (vLLM's automatic prefix caching, small).

Most prompts start the same way (the chat template's system prompt, a bot's
persona, a conversation so far), and computing their keys and values again
for every request is most of a short prompt's time to first token. After a
prompt is prefilled, each full block of `BLOCK` tokens is kept (an LRU of at
most `max_blocks`); a new request copies the longest chain of known blocks
into its slot and prefills only the rest.

A block's key is a hash chained over every token before it and the adapter
version serving the request (LoRA changes keys and values): a block is only
ever reused for exactly the same prefix on exactly the same weights. blake2b,
not Python's `hash`, so nobody can craft a prompt that collides with another
user's prefix.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from model.kv_cache import SlotCache

BLOCK = 16  # tokens per cached block
DEFAULT_MAX_BLOCKS = 128  # 2048 tokens: the system prompts and recent conversations of a small bot


@dataclass(frozen=True)
class Block:
    k: torch.Tensor  # [layers, kv_heads, BLOCK, head_dim]
    v: torch.Tensor


def block_keys(ids: list[int], adapter: Optional[str], blocks: int) -> list[bytes]:
    """Chained digests of the first `blocks` full blocks of `ids` under `adapter`."""
    keys, h = [], hashlib.blake2b((adapter or "").encode(), digest_size=16).digest()
    for i in range(blocks):
        chunk = ",".join(map(str, ids[i * BLOCK:(i + 1) * BLOCK])).encode()
        h = hashlib.blake2b(h + chunk, digest_size=16).digest()
        keys.append(h)
    return keys


class PrefixCache:
    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS):
        self.max_blocks = max_blocks
        self._blocks: collections.OrderedDict[bytes, Block] = collections.OrderedDict()
        self.hits = 0  # tokens served from the cache (for metrics and tests)

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()

    def load(self, cache: SlotCache, slot: int, ids: list[int], adapter: Optional[str]) -> int:
        """Copy the longest known prefix of `ids` into `slot`; returns its length in tokens.

        At least one prompt token is always left to prefill (its logits give the first answer token).
        """
        if self.max_blocks <= 0:
            return 0
        found: list[Block] = []
        for key in block_keys(ids, adapter, (len(ids) - 1) // BLOCK):
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        if not found:
            return 0
        n = len(found) * BLOCK
        cache.reserve(n)
        for layer in range(cache.num_layers):
            cache.k[layer][slot, :, :n] = torch.cat([b.k[layer] for b in found], dim=1)
            cache.v[layer][slot, :, :n] = torch.cat([b.v[layer] for b in found], dim=1)
        self.hits += n
        return n

    def store(self, cache: SlotCache, slot: int, ids: list[int], adapter: Optional[str]) -> None:
        """Keep the full blocks of the prompt `ids`, now prefilled in `slot`."""
        if self.max_blocks <= 0:
            return
        for i, key in enumerate(block_keys(ids, adapter, len(ids) // BLOCK)):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            span = slice(i * BLOCK, (i + 1) * BLOCK)
            self._blocks[key] = Block(torch.stack([k[slot, :, span] for k in cache.k]),
                                      torch.stack([v[slot, :, span] for v in cache.v]))
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
