"""CPU weight layouts (model.packed_linear): a packed layer computes what nn.Linear computes.

Siblings of one input laid out for oneDNN (q/k/v and gate/up in bf16 where oneDNN has bf16
kernels; gate/up in float32) share one stacked oneDNN weight; each module still answers alone, in any call order and for any input (the one contract: siblings called on one
input do not see it changed in place between their calls, as in every Llama / Qwen2 layer), and
the group holds nothing once every sibling has taken its columns. These are the layouts where
model.bf16_rows' kernels do not run (no AVX-512 BF16, an AMX CPU, no compiler, turned off): here
they are turned off (tests/test_bf16_rows.py covers their own layout).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.packed_linear import Layout, PackedLinear, onednn_bf16, pack_linears
from tests.support.kernels import turn_off_kernels


@pytest.fixture(autouse=True)
def no_kernels(monkeypatch):
    """As on a CPU where bf16_rows' kernels do not run (LOOPCORD_BF16_ROWS=0)."""
    turn_off_kernels(monkeypatch)


class Attention(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32, bias), nn.Linear(32, 16, bias), nn.Linear(32, 16, bias)
        self.o_proj = nn.Linear(32, 32, bias)


def _pair(bias: bool, dtype=torch.bfloat16):
    torch.manual_seed(0)
    plain = Attention(bias).to(dtype).eval()
    packed = Attention(bias).to(dtype).eval()
    packed.load_state_dict(plain.state_dict())
    pack_linears(packed)
    return plain, packed


def _close(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_siblings_share_one_weight_and_answer_as_nn_linear(bias):
    """Where oneDNN has bf16 kernels: q/k/v stacked in one oneDNN weight, the only copy. Where it
    has none (an AVX2-only CPU, which refuses to lay one out): q/k/v side by side for `torch.mm`,
    each module's weight a column view of the group's."""
    plain, packed = _pair(bias)
    group = packed.q_proj.fused
    assert group is packed.k_proj.fused is packed.v_proj.fused
    if onednn_bf16():
        assert group.layout is Layout.ONEDNN
        assert all(isinstance(m, PackedLinear) and m.packed is None for m in group.members)
        assert packed.o_proj.fused is None and packed.o_proj.layout is Layout.ONEDNN
    else:
        assert group.layout is Layout.TRANSPOSED and group.weight.dtype == torch.bfloat16
        assert all(m.packed.data_ptr() >= group.weight.data_ptr() for m in group.members)
        assert packed.o_proj.fused is None and packed.o_proj.layout is Layout.TRANSPOSED
    x, other = torch.randn(3, 5, 32, dtype=torch.bfloat16), torch.randn(4, 32, dtype=torch.bfloat16)
    names = ("q_proj", "k_proj", "v_proj")
    for order in (names, names[::-1], ("k_proj", "k_proj", "q_proj")):  # as transformers calls them, and not
        for name in order:
            out = getattr(packed, name)(x)
            assert out.shape == (3, 5, getattr(plain, name).out_features)
            _close(out, getattr(plain, name)(x))
    # another input between siblings is computed afresh, and so is the one before it
    _close(packed.q_proj(x), plain.q_proj(x))
    _close(packed.k_proj(other), plain.k_proj(other))
    _close(packed.v_proj(x), plain.v_proj(x))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(32, 96, False), nn.Linear(32, 96, False), nn.Linear(96, 32, False)


def test_float32_gate_and_up_share_one_onednn_weight_and_answer_as_nn_linear():
    torch.manual_seed(0)
    plain = MLP().eval()
    packed = MLP().eval()
    packed.load_state_dict(plain.state_dict())
    pack_linears(packed)
    group = packed.gate_proj.fused
    assert group is packed.up_proj.fused and group.layout is Layout.ONEDNN and group.weight.dtype == torch.float32
    assert packed.down_proj.fused is None and packed.down_proj.layout is Layout.TRANSPOSED
    x, other = torch.randn(3, 32), torch.randn(5, 32)
    for name in ("gate_proj", "up_proj", "up_proj", "gate_proj", "down_proj"):
        mod = getattr(packed, name)
        inp = x if name != "down_proj" else torch.randn(3, 96)
        torch.testing.assert_close(mod(inp), getattr(plain, name)(inp), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.up_proj(other), plain.up_proj(other), rtol=1e-5, atol=1e-5)
    # the module's own weight, as peft's DoRA reads it, comes back out of the stacked copy
    torch.testing.assert_close(packed.up_proj.dense_weight(), plain.up_proj.weight, rtol=0, atol=0)


def test_float32_keeps_the_transposed_layout_with_column_views():
    plain, packed = _pair(False, torch.float32)
    group = packed.q_proj.fused
    assert group.layout is Layout.TRANSPOSED and packed.q_proj.packed.data_ptr() == group.weight.data_ptr()
    x = torch.randn(4, 32)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        torch.testing.assert_close(getattr(packed, name)(x), getattr(plain, name)(x), rtol=1e-5, atol=1e-5)


def test_once_every_sibling_has_its_columns_the_group_holds_nothing():
    packed = MLP().eval()  # float32 gate/up: stacked for oneDNN on every CPU
    pack_linears(packed)
    x = torch.randn(2, 32)
    packed.gate_proj(x)
    assert packed.gate_proj.fused._last is not None  # up's columns wait for it
    packed.up_proj(x)
    assert packed.gate_proj.fused._last is None
