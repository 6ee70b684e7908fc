"""A lean decode step and prompt prefill for Llama-family models (Llama, Qwen2), gpt-fast style.

A transformers forward costs about 1,500 small operations per decode step on
SmolLM2 (30 layers): mask building, the cache interface, peft's per-module
dispatch for 7 LoRA projections a layer. At a few rows per step on a CPU that
bookkeeping, not the arithmetic, is most of the step. This module runs the same
computation directly on the model's own modules and weights (nothing copied):

    h = embed(tokens)
    per layer: x = norm(h); q, k, v = proj(x) (+ LoRA); rotary; write k, v into the
               slot cache in place; h += o(attention(q, cache[:width])); x = norm(h);
               h += down(act(gate(x)) * up(x)) (+ LoRA on each)
    logits = lm_head(norm(h))

q, k and v come from one GEMM, and so do gate and up, where the CPU weights were
laid out as one group (packed_linear), the rotary embedding (the model's own cos / sin,
Llama's rotate-half formula) turns q and k in one pass, LoRA updates are added
into the projections' outputs in place, and rows all at one position need no mask.

The same layers run prompt chunks (`prefill`): every chunk's tokens as the rows of
one batch, with no padding (the transformers path left-pads chunks to the longest),
attention per chunk, each token seeing its slot's positions up to its own.

It is used only where it computes exactly what the transformers forward would:
one adapter (or none) for the whole batch, plain LoRA on the projections (no
DoRA, no LoRA bias; peft has wrapped nothing else: no modules_to_save, nothing on
the embeddings, the head or the norms), and a decoder layer made only of the parts
above. Anything else (a batch mixing adapters, other
architectures, sliding-window attention) goes through transformers as before;
where bf16 layers run on model.bf16_rows' kernels (AVX-512 BF16 without AMX),
decode attention runs on its attention kernel too (float32 sums over the bf16 cache);
`FastDecode.build` says None for a model it does not cover.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from model import bf16_rows

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# bf16 decode attention by matmuls (a CPU without AMX): up to this many rows the cache views are
# read into float32 first, where the small products run 1.2-2x faster than bf16's (AMD EPYC, 80-2048
# positions); at 32 rows the copy costs more than it saves (2.6x slower at 2048 positions)
FLOAT32_ATTENTION_ROWS = 8
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _covered(model) -> bool:
    base = _base_model(model)
    cfg = base.config
    if type(base).__name__ not in SUPPORTED or getattr(cfg, "use_sliding_window", False):
        return False
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return False
    inner = getattr(base, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or any(hasattr(attn, a) for a in ("q_norm", "k_norm", "sinks")):
            return False
        if not all(hasattr(attn, p) for p in PROJECTIONS[:4]) or not all(hasattr(mlp, p) for p in PROJECTIONS[4:]):
            return False
    return True


def cpu_bf16_sdpa_wins() -> bool:
    """Whether decode attention in bf16 on this CPU goes through SDPA's kernel rather than two
    matmuls: with AMX tiles (its flash kernel's bf16 GEMMs run on them) SDPA was 2.4-3.6x the
    matmuls at 1-32 rows (Intel Xeon); without AMX (an AMD EPYC with AVX-512 BF16) it is the
    slower one, 1.3x at one row and 4-6x at 8-32 rows over 80-2048 positions (54% of a 32-row step)."""
    return bf16_rows.amx_tiles()


class FastDecode:
    def __init__(self, model):
        base = _base_model(model)
        cfg = base.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.cpu_bf16_sdpa = cpu_bf16_sdpa_wins()
        # bf16 decode attention through bf16_rows' kernel where bf16 layers run on it (see decode)
        self.bf16_kernel_attention = bf16_rows.runs_here() and bf16_rows.attention_covers(
            self.heads, self.kv_heads, self.head_dim)

    @classmethod
    def build(cls, model) -> Optional["FastDecode"]:
        return cls(model) if _covered(model) else None

    @staticmethod
    def _plain_lora(module, name: Optional[str]) -> bool:
        """Whether projection `module` (maybe peft-wrapped) runs here for adapter `name`: no
        adapter on it, or a plain LoRA (no DoRA, no LoRA bias)."""
        if name is None or name not in getattr(module, "lora_A", {}):
            return True
        if getattr(module, "use_dora", {}).get(name) or getattr(module, "lora_bias", {}).get(name):
            return False
        return isinstance(module.lora_A[name], torch.nn.Linear) and isinstance(module.lora_B[name], torch.nn.Linear)

    def covers(self, model, name: Optional[str]) -> bool:
        """Whether a batch all on adapter `name` (None: the base) runs here: peft may have wrapped
        the projections only (no modules_to_save, nothing on the embeddings, the head or the
        norms), and `name` is plain LoRA on each."""
        inner = _base_model(model).model
        projections = {id(getattr(layer.self_attn, p)) for layer in inner.layers for p in PROJECTIONS[:4]}
        projections |= {id(getattr(layer.mlp, p)) for layer in inner.layers for p in PROJECTIONS[4:]}
        for module in _base_model(model).modules():
            wrapped = hasattr(module, "base_layer") or hasattr(module, "modules_to_save")
            if wrapped and (id(module) not in projections or not self._plain_lora(module, name)):
                return False
        return True

    @staticmethod
    def _unwrap(module):
        return getattr(module, "base_layer", module)

    @staticmethod
    def _lora(module, x: torch.Tensor, out: torch.Tensor, name: Optional[str]) -> torch.Tensor:
        """Adds adapter `name`'s low-rank update of `module` (peft-wrapped or not) to `out` in place."""
        if name is not None and name in getattr(module, "lora_A", {}):
            lora_a, lora_b = module.lora_A[name], module.lora_B[name].weight
            a = lora_a(x.to(lora_a.weight.dtype)).reshape(-1, lora_b.shape[1])
            flat = out.view(-1, out.shape[-1])
            if flat.dtype == lora_b.dtype:
                flat.addmm_(a, lora_b.t(), alpha=module.scaling[name])
            else:  # a bf16 base with float32 adapter weights (peft's default): as peft does, the
                # update is added in the adapter's dtype and the sum cast back
                flat.copy_(flat.to(lora_b.dtype).addmm_(a, lora_b.t(), alpha=module.scaling[name]))
        return out

    def _linear(self, module, x: torch.Tensor, name: Optional[str]) -> torch.Tensor:
        return self._lora(module, x, self._unwrap(module)(x), name)

    def _siblings(self, mods: tuple, x: torch.Tensor, name: Optional[str]) -> torch.Tensor:
        """[n, sum of outs] of projections `mods` of one input x [n, hidden] (q/k/v; gate/up): one
        GEMM where their CPU weights were laid out as one group (packed_linear: side by side in
        float32, stacked for oneDNN), with each projection's LoRA added to its columns."""
        bases = tuple(self._unwrap(m) for m in mods)
        group = getattr(bases[0], "fused", None)
        if group is not None and group.members == bases:
            out = group(x)
        else:
            out = torch.cat([b(x) for b in bases], dim=-1)
        if name is not None:
            start = 0
            for m, b in zip(mods, bases):
                self._lora(m, x, out[:, start:start + b.out_features], name)
                start += b.out_features
        return out

    @staticmethod
    def _norm(module, x: torch.Tensor) -> torch.Tensor:
        """The module's RMSNorm (Llama's, Qwen2's) with torch's fused kernel: float32 in one call;
        bf16 / fp16 as the module computes it, normalised in float32, cast, then times the weight."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
        return module.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=module.variance_epsilon).to(x.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                scale: float) -> torch.Tensor:
        """Attention of one new query per row, q [n, heads, hd], over k, v [n, kv_heads, width, hd]
        (views of the cache); returns [n, heads * hd]. SDPA for one row in float32, and in bf16
        off the CPU or where its CPU kernel is the fast one (`cpu_bf16_sdpa_wins`); otherwise two
        batched matmuls with each key/value head's query group side by side, which on CPU beat
        SDPA's kernel for a single query position by 1.2-1.7x at 8-32 rows in float32 (the longer
        the context, the more). (Where bf16 layers run on bf16_rows, `decode` uses its kernel.)"""
        n, heads, hd = q.shape
        kv_heads = k.shape[1]
        if q.dtype == torch.float32:
            sdpa = n == 1
        else:  # bf16 (float16 on a GPU)
            sdpa = q.device.type != "cpu" or self.cpu_bf16_sdpa
        if sdpa:
            o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=kv_heads != heads)
            return o.view(n, heads * hd)
        group = heads // kv_heads
        dtype = q.dtype
        if dtype != torch.float32 and n <= FLOAT32_ATTENTION_ROWS:  # see FLOAT32_ATTENTION_ROWS
            q, k, v = q.float(), k.float(), v.float()
            mask = mask.float() if mask is not None else None
        scores = torch.matmul(q.reshape(n, kv_heads, group, hd), k.transpose(-1, -2)).mul_(scale)
        if mask is not None:
            scores.add_(mask)  # [n, 1, 1, width]: each row's own positions
        return torch.matmul(torch.softmax(scores, dim=-1), v).view(n, heads * hd).to(dtype)

    def decode(self, model, cache, tokens: torch.Tensor, positions: torch.Tensor, width: int,
               name: Optional[str], ragged: bool) -> torch.Tensor:
        """Logits [n, V] for rows 0..n-1, row i feeding tokens[i] at positions[i]; keys and values
        are written into `cache` (a kv_cache.SlotCache with room for `width` positions).
        `ragged`: whether some row is not at position width - 1 (the caller knows from its list)."""
        n = tokens.shape[0]
        dtype = _base_model(model).get_input_embeddings().weight.dtype
        kernel = dtype == torch.bfloat16 and self.bf16_kernel_attention and tokens.device.type == "cpu"
        rows, mask = torch.arange(n, device=tokens.device), None
        if kernel:  # bf16_rows' attention: each row reads its own positions once, in float32 (no mask, no copies)
            lengths = (positions + 1 if ragged else torch.full((n,), width)).to(torch.int32)
        elif ragged:  # each row attends to its own positions: one additive mask for every layer
            keep = torch.arange(width, device=tokens.device)[None, :] <= positions[:, None]
            mask = torch.zeros(keep.shape, dtype=dtype, device=tokens.device).masked_fill_(~keep, float("-inf"))
            mask = mask[:, None, None, :]
        # else every row is at position width - 1: it sees the whole cache view

        def attend(i, attn, q, k, v):
            kc, vc = cache.k[i], cache.v[i]
            if ragged:
                kc[rows, :, positions] = k
                vc[rows, :, positions] = v
            else:
                kc[:n, :, width - 1] = k
                vc[:n, :, width - 1] = v
            if kernel:
                return bf16_rows.attention(q, kc, vc, lengths, width, attn.scaling)
            return self._attend(q, kc[:n, :, :width], vc[:n, :, :width], mask, attn.scaling)

        h = self._layers(model, tokens, positions[:, None], name, attend)
        base = _base_model(model)
        return base.get_output_embeddings()(self._norm(base.model.norm, h))

    def prefill(self, model, cache, slots: list[int], pieces: list[torch.Tensor], starts: list[int],
                name: Optional[str]) -> torch.Tensor:
        """Logits [B, V] after the last token of each of B prompt chunks: pieces[b] (token ids [T_b])
        fed at positions starts[b].. of cache slot slots[b] (positions before starts[b] already hold
        that sequence's keys and values). The chunks' tokens run as the rows of one batch, no
        padding; attention is per chunk, each token seeing its slot's positions up to its own."""
        device = pieces[0].device
        spans, offset = [], 0  # (slot, first row, rows, start position, causal mask or None)
        rows_at = []  # each chunk's positions
        for slot, piece, start in zip(slots, pieces, starts):
            length = piece.shape[0]
            rows_at.append(torch.arange(start, start + length, device=device))
            causal = None
            if length > 1:  # token t sees positions 0..start+t
                causal = torch.arange(start + length, device=device)[None, :] <= rows_at[-1][:, None]
            spans.append((slot, offset, length, start, causal))
            offset += length
        tokens = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        positions = torch.cat(rows_at) if len(rows_at) > 1 else rows_at[0]
        heads, hd = self.heads, self.head_dim
        gqa = self.kv_heads != heads

        def attend(i, attn, q, k, v):
            kc, vc = cache.k[i], cache.v[i]
            out = torch.empty(q.shape[0], heads * hd, dtype=q.dtype, device=q.device)
            for slot, first, length, start, causal in spans:
                rows, end = slice(first, first + length), start + length
                kc[slot, :, start:end] = k[rows].transpose(0, 1)
                vc[slot, :, start:end] = v[rows].transpose(0, 1)
                o = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], kc[slot:slot + 1, :, :end],
                                                   vc[slot:slot + 1, :, :end], attn_mask=causal, scale=attn.scaling,
                                                   enable_gqa=gqa)
                out[rows] = o[0].transpose(0, 1).reshape(length, heads * hd)
            return out

        h = self._layers(model, tokens, positions[:, None], name, attend)
        last = torch.tensor([first + length - 1 for _, first, length, _, _ in spans], device=device)
        base = _base_model(model)
        return base.get_output_embeddings()(self._norm(base.model.norm, h[last]))

    def _layers(self, model, tokens: torch.Tensor, positions: torch.Tensor, name: Optional[str], attend) -> torch.Tensor:
        """The decoder layers over rows of one token each (tokens [r], positions [r, 1]): hidden
        states [r, hidden] before the final norm. `attend(i, attn, q, k, v)` stores layer i's keys
        and values (q [r, heads, hd], k and v [r, kv_heads, hd], rotary applied) and returns the
        attention output [r, heads * hd]."""
        inner = _base_model(model).model
        r = tokens.shape[0]
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        half = hd // 2
        h = inner.embed_tokens(tokens)  # [r, hidden]
        cos, sin = inner.rotary_emb(h, positions)  # [r, 1, hd]
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): the sign folded in once a step
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        qk_heads = heads + kv_heads
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = self._norm(layer.input_layernorm, h)
            qkv = self._siblings((attn.q_proj, attn.k_proj, attn.v_proj), x, name)
            qk = qkv[:, :qk_heads * hd].view(r, qk_heads, hd)
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)  # roll by half: cat(x2, x1)
            o = attend(i, attn, qk[:, :heads], qk[:, heads:], qkv[:, qk_heads * hd:].view(r, kv_heads, hd))
            h = h + self._linear(attn.o_proj, o, name)
            x = self._norm(layer.post_attention_layernorm, h)
            gate_up = self._siblings((mlp.gate_proj, mlp.up_proj), x, name)
            inter = self._unwrap(mlp.gate_proj).out_features
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
            h = h + self._linear(mlp.down_proj, mlp.act_fn(gate).mul_(up), name)
        return h
