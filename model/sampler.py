"""Next-token sampling for a whole batch in tensor ops, with no per-row host sync.

Greedy rows (temperature below `GREEDY_BELOW`, as vLLM treats them) take the
exact argmax of the logits. Other rows: temperature, then top-p (nucleus:
keep the smallest prefix of sorted tokens whose mass reaches top_p, the token
that crosses it included), then one draw by the exponential-race trick that
gpt-fast's `multinomial_sample_one_no_sync` uses: argmax(p / E) with
E ~ Exp(1) picks token i with probability p_i. A seeded row draws its noise
from its own generator, so its answer does not depend on its neighbours'
draws; unseeded rows share the global generator in one call.

Non-finite logits never raise here (torch.multinomial would, failing the
whole batch): the caller gets a per-row `bad` mask and fails those rows alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's _SAMPLING_EPS)


@dataclass(frozen=True)
class SamplingRow:
    temperature: float
    top_p: float
    generator: Optional[torch.Generator]


@dataclass(frozen=True)
class Sampled:
    tokens: torch.Tensor  # [B] long
    bad: torch.Tensor  # [B] bool: the row's logits were not all finite


def sample(logits: torch.Tensor, rows: Seq[SamplingRow]) -> Sampled:
    """Next token per row of `logits` [B, V]."""
    bad = non_finite_rows(logits)
    tokens = greedy(logits)
    drawn = [i for i, r in enumerate(rows) if r.temperature >= GREEDY_BELOW]
    if not drawn:
        return Sampled(tokens, bad)
    index = torch.tensor(drawn, device=logits.device)
    temps = torch.tensor([rows[i].temperature for i in drawn], dtype=torch.float32, device=logits.device)
    probs = torch.softmax(logits[index].float() / temps[:, None], dim=-1)
    top_p = [rows[i].top_p for i in drawn]
    if any(p < 1.0 for p in top_p):
        probs = _top_p(probs, torch.tensor(top_p, dtype=torch.float32, device=logits.device))
    noise = torch.empty_like(probs).exponential_(1)
    for j, i in enumerate(drawn):
        gen = rows[i].generator
        if gen is not None:  # seeded: its own stream of noise (generators live on the CPU)
            noise[j] = torch.empty(probs.shape[-1], dtype=probs.dtype).exponential_(1, generator=gen).to(probs.device)
    tokens[index] = greedy(probs / noise)
    return Sampled(tokens, bad)


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """Index of each row's highest score, the first one on ties (as `argmax`). On CPU `max` over
    a dimension is 1.7x (float32) to 4x (bf16) faster than `argmax` over a 49k vocabulary."""
    return scores.max(-1).indices


def non_finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: the row has a NaN or infinite score. A row's float32 sum is finite whenever all
    its scores are (NaN and infinities carry through a sum), so only rows whose sum is not
    (a bad score, or finite ones summing past float32's range) are checked score by score:
    on CPU a sum is ~10x cheaper than `isfinite(...).all(-1)` over a 49k vocabulary."""
    suspect = ~logits.sum(-1, dtype=torch.float32).isfinite()
    if not bool(suspect.any()):
        return suspect
    bad = suspect.clone()
    bad[suspect] = ~torch.isfinite(logits[suspect]).all(-1)
    return bad


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]  # keep the token that crosses top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
