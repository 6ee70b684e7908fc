"""A LoRA linear layer's forward and backward as one autograd node, for training.

peft's `lora.Linear` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as
separate operations, and autograd records each: the scaling multiply and the sum
are full-size [tokens, out] passes forward, and backward adds a full-size multiply
for the scaling and a full-size sum of the two input gradients. On a CPU those
elementwise passes are about a tenth of a SmolLM2 training step. Written as one
function, the low-rank update is added inside the GEMM's accumulation
(`addmm_(..., alpha=scaling)`), the scaling lands on [tokens, r] and [out, r]
tensors, and the input gradient is accumulated by one `addmm_`:

    forward:  xa = x A^T;  y = x W^T + b;  y += s * xa B^T
    backward: g_xa = s * g B;  dB = s * g^T xa;  dA = g_xa^T x;  dx = g W + g_xa A

Same arithmetic as peft's (to float rounding), same parameters (peft's own
`lora_A` / `lora_B` weights), so the adapter is saved and loaded exactly as before.
Used only where that is exactly peft's computation: one active plain LoRA (no
DoRA, no LoRA bias, no dropout), adapters enabled and not merged, the frozen base
weight, one dtype, no autocast, no `adapter_names`. Anything else runs peft's
forward unchanged.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float):
        flat = x.reshape(-1, x.shape[-1])
        xa = torch.mm(flat, a.t())
        out = F.linear(flat, weight, bias)
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(flat, xa, weight, a, b)
        ctx.scaling = scaling
        ctx.in_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, xa, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        g_xa = torch.mm(g, b).mul_(s)
        grad_b = torch.mm(g.t(), xa).mul_(s)
        grad_a = torch.mm(g_xa.t(), flat)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight).addmm_(g_xa, a).view(ctx.in_shape)
        return grad_x, None, None, grad_a, grad_b, None


def _plain(module, x: torch.Tensor, kwargs: dict):
    """The adapter this call can run fused, or None (peft's forward then)."""
    if kwargs or module.disable_adapters or module.merged:
        return None
    active = module.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}) or module.use_dora.get(name):
        return None  # DoRA and the other variants: peft's own forward
    if getattr(module, "lora_bias", {}).get(name):
        return None
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and not (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0):
        return None
    base = module.base_layer
    a, b = module.lora_A[name], module.lora_B[name]
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)) or a.bias is not None or b.bias is not None:
        return None
    if torch.is_autocast_enabled(x.device.type) or len({x.dtype, base.weight.dtype, a.weight.dtype, b.weight.dtype}) != 1:
        return None
    return name


def _fused_forward(self, x, *args, **kwargs):
    name = None if args else _plain(self, x, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                             float(self.scaling[name]))


@contextlib.contextmanager
def fused_lora(model):
    """Within: every peft LoRA linear layer of `model` runs as one autograd node where that is
    exactly peft's computation (see the module docstring); restored on exit."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # no peft: nothing to fuse
        yield 0
        return
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    for m in layers:
        m.forward = types.MethodType(_fused_forward, m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
