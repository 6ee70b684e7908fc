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
into the projections' outputs in place, a group's at once (`LoRA`: one kernel call on
CPU where peft's forward makes five or six operations a projection), and rows all at
one position need no mask.

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
from model.packed_linear import Layout

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


def _projections(layer) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return tuple(getattr(attn, p) for p in PROJECTIONS[:4]) + tuple(getattr(mlp, p) for p in PROJECTIONS[4:])


def _groups(layer) -> tuple:
    """The layer's projections by the input they read: (q, k, v), (o,), (gate, up), (down,)."""
    p = _projections(layer)
    return p[0:3], p[3:4], p[4:6], p[6:7]


def _gemm(bases: tuple):
    """x [r, in] -> the outputs of projections `bases` (unwrapped, one input) side by side: one
    call where their CPU weights were laid out as one group (packed_linear), bf16_rows' kernel
    called directly for its layout, the modules' own forward otherwise."""
    group = getattr(bases[0], "fused", None)
    if group is not None and group.members == bases:
        call, layout, weight, bias, outs = group, group.layout, group.weight, group.bias, group.out_features
    elif len(bases) == 1:
        base = bases[0]
        call, layout, weight = base, getattr(base, "layout", None), getattr(base, "packed", None)
        bias, outs = base.bias, base.out_features
    else:
        return lambda x: torch.cat([b(x) for b in bases], dim=-1)
    if layout is Layout.ROWS and weight is not None:
        if bias is None:
            return lambda x: bf16_rows.matmul(x, weight, outs)
        return lambda x: bf16_rows.matmul(x, weight, outs).add_(bias)
    return call


class _LayerPlan:
    """One decoder layer's parts, looked up once (a step otherwise walks ~800 module attributes):
    its attention module (for its scaling), the two norms (module, weight, eps), the GEMMs of
    q/k/v, o, gate/up and down (`_gemm`), the MLP's activation and its width."""

    def __init__(self, layer):
        groups = [tuple(getattr(m, "base_layer", m) for m in mods) for mods in _groups(layer)]
        self.attn = layer.self_attn
        self.norms = tuple((n, n.weight, n.variance_epsilon)
                           for n in (layer.input_layernorm, layer.post_attention_layernorm))
        self.qkv, self.o, self.gate_up, self.down = (_gemm(g) for g in groups)
        self.act, self.inter = layer.mlp.act_fn, groups[2][0].out_features


class LoRA:
    """One adapter's update of a group of projections that read one input (q/k/v, gate/up, or one
    projection), as two products: out += (x @ a.T) @ bt, a the members' A stacked [sum of ranks,
    in], bt their B transposed and scaled, block-diagonal [sum of ranks, sum of outs], in float32
    (peft keeps adapter weights in float32 and adds the update in float32 to a bf16 base's output,
    rounding the sum once: so here). On CPU where model.bf16_rows' kernels run, one kernel call;
    elsewhere two matmuls and the add, where peft's forward is
    five or six operations for each projection."""

    def __init__(self, a: torch.Tensor, bt: torch.Tensor):
        self.a, self.bt, self.outs = a, bt, bt.shape[1]
        self.kernel = a.device.type == "cpu" and bf16_rows.runs_here() and a.shape[0] <= bf16_rows.MAX_LORA_RANK
        if self.kernel:  # laid out for the kernel, the only copy
            self.packed = bf16_rows.lora_pack(a, bt)
            self.a = self.bt = None

    @classmethod
    def stack(cls, mods: tuple, name: str) -> Optional["LoRA"]:
        """The group's update for adapter `name`, or None where none of `mods` has one."""
        outs = [getattr(m, "base_layer", m).out_features for m in mods]
        parts = [(i, m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name])
                 for i, m in enumerate(mods) if name in getattr(m, "lora_A", {})]
        if not parts:
            return None
        a = torch.cat([pa.float() for _, pa, _, _ in parts]).contiguous()
        bt = torch.zeros(a.shape[0], sum(outs), dtype=torch.float32, device=a.device)
        rank = 0
        for i, pa, pb, scaling in parts:
            start = sum(outs[:i])
            bt[rank:rank + pa.shape[0], start:start + outs[i]] = pb.float().t() * scaling
            rank += pa.shape[0]
        return cls(a, bt)

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [n, sum of outs] += the update of x [n, in], in place."""
        if self.kernel:
            bf16_rows.lora_add(x, *self.packed, self.outs, out)
        elif out.dtype == torch.float32:
            out.addmm_(x.float() @ self.a.t(), self.bt)
        else:
            out.copy_(torch.addmm(out.float(), x.float() @ self.a.t(), self.bt))


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
        self.cpu_kernels = bf16_rows.runs_here()  # residual adds and norms (`_add_norm`) there too
        self._plans: Optional[tuple] = None  # (what they were built from, the layers' `_LayerPlan`s)
        self._loras: dict = {}  # adapter name -> (its first LoRA weight, per layer the groups' LoRAs)
        self._loras_for: tuple = ()  # the adapters loaded when those were built

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

    def _layer_loras(self, model, name: Optional[str]) -> Optional[list]:
        """Adapter `name`'s updates for each layer, (q/k/v, o, gate/up, down) as `LoRA`s (None
        where no projection of the group has one), built on first use and kept while the same
        adapters are loaded (`name` is one adapter version's fresh internal name)."""
        if name is None:
            return None
        inner = _base_model(model).model
        first = next((m.lora_A[name].weight for layer in inner.layers for m in _projections(layer)
                      if name in getattr(m, "lora_A", {})), None)
        loaded = tuple(getattr(model, "peft_config", {}))
        if self._loras_for != loaded:
            self._loras, self._loras_for = {}, loaded  # adapters were loaded or deleted since
        kept = self._loras.get(name)
        if kept is None or kept[0] is not first:
            kept = (first, [tuple(LoRA.stack(mods, name) for mods in _groups(layer)) for layer in inner.layers])
            self._loras[name] = kept
        return kept[1]

    def _layer_plans(self, inner) -> list:
        """The layers' `_LayerPlan`s, rebuilt where the layers or their first projection's layout
        are not the ones they were built from (peft wraps the projections; their base layers stay)."""
        first = self._unwrap(inner.layers[0].self_attn.q_proj)
        built_from = (inner.layers, first, type(first), getattr(first, "packed", None), getattr(first, "fused", None))
        if self._plans is None or any(a is not b for a, b in zip(self._plans[0], built_from)):
            self._plans = (built_from, [_LayerPlan(layer) for layer in inner.layers])
        return self._plans[1]

    @staticmethod
    def _project(gemm, x: torch.Tensor, lora: Optional["LoRA"]) -> torch.Tensor:
        """A projection group's outputs [n, sum of outs] of x [n, in], its LoRA updates added."""
        out = gemm(x)
        if lora is not None:
            lora.add_to(x, out)
        return out

    def _add_norm(self, norm: tuple, h: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.Tensor:
        """h += delta in place (the residual add, where delta is given), then the RMSNorm `norm`
        (module, weight, eps) of h: in one bf16_rows kernel call on CPU where the kernels run,
        else as torch computes it."""
        module, weight, eps = norm
        if self.cpu_kernels and h.device.type == "cpu" and weight.dtype == h.dtype and h.dtype in bf16_rows.DTYPES:
            return bf16_rows.add_rms_norm(h, delta, weight, eps)
        if delta is not None:
            h.add_(delta)
        return self._norm(module, h)

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

        at = positions.to(torch.int64)

        def attend(i, attn, qkv, cos, sin):
            kc, vc = cache.k[i], cache.v[i]
            if kernel:  # the rotary embedding, the cache writes and attention: two calls
                q = bf16_rows.rotary_store(qkv, self.heads, self.kv_heads, cos.view(n, -1), sin.view(n, -1), at,
                                           kc, vc)
                return bf16_rows.attention(q, kc, vc, lengths, width, attn.scaling)
            q, k, v = self._turn(qkv, cos, sin)
            if ragged:
                kc[rows, :, positions] = k
                vc[rows, :, positions] = v
            else:
                kc[:n, :, width - 1] = k
                vc[:n, :, width - 1] = v
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

        def attend(i, attn, qkv, cos, sin):
            q, k, v = self._turn(qkv, cos, sin)
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

    def _turn(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """q [r, heads, hd], k and v [r, kv_heads, hd] out of q/k/v's outputs side by side (qkv
        [r, (heads + 2 kv_heads) * hd]), q and k turned by the rotary embedding (cos, sin [r, 1,
        hd], sin with rotate-half's sign folded in) in one pass."""
        r, heads, kv_heads, hd = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        qk = qkv[:, :(heads + kv_heads) * hd].view(r, heads + kv_heads, hd)
        qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)  # roll by half: cat(x2, x1)
        return qk[:, :heads], qk[:, heads:], qkv[:, (heads + kv_heads) * hd:].view(r, kv_heads, hd)

    def _layers(self, model, tokens: torch.Tensor, positions: torch.Tensor, name: Optional[str], attend) -> torch.Tensor:
        """The decoder layers over rows of one token each (tokens [r], positions [r, 1]): hidden
        states [r, hidden] before the final norm. `attend(i, attn, qkv, cos, sin)` turns layer i's
        queries and keys by the rotary embedding (`_turn`: qkv the q/k/v outputs side by side [r,
        (heads + 2 kv_heads) * hd], cos and sin [r, 1, hd], sin's sign folded), stores its keys and
        values and returns the attention output [r, heads * hd]."""
        inner = _base_model(model).model
        loras = self._layer_loras(model, name)
        half = self.head_dim // 2
        h = inner.embed_tokens(tokens)  # [r, hidden], the residual stream, updated in place
        pending = None  # the last MLP output, added with the next norm
        cos, sin = inner.rotary_emb(h, positions)  # [r, 1, hd]
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): the sign folded in once a step
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        project = self._project
        for i, plan in enumerate(self._layer_plans(inner)):
            qkv_lora, o_lora, gate_up_lora, down_lora = loras[i] if loras is not None else (None,) * 4
            x = self._add_norm(plan.norms[0], h, pending)  # the previous layer's MLP output added
            o = attend(i, plan.attn, project(plan.qkv, x, qkv_lora), cos, sin)
            x = self._add_norm(plan.norms[1], h, project(plan.o, o, o_lora))
            gate_up = project(plan.gate_up, x, gate_up_lora)
            gate, up = gate_up[:, :plan.inter], gate_up[:, plan.inter:]
            pending = project(plan.down, plan.act(gate).mul_(up), down_lora)
        return h if pending is None else h.add_(pending)
