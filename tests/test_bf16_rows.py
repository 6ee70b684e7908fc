"""The few-row bf16 kernel (model.bf16_rows) and the layers that use it (model.packed_linear).

Where it runs (AVX-512 BF16 without AMX, a C compiler), a bf16 layer laid out for oneDNN
answers 1-4 rows through it and more rows through oneDNN, and both answer as nn.Linear
does, to bf16 rounding; where it cannot be built the layers answer through oneDNN alone.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from model import bf16_rows
from model.packed_linear import PackedLinear, onednn_bf16, pack_linears

runs_here = pytest.mark.skipif(bf16_rows.kernel() is None,
                               reason="the kernel does not run on this CPU (needs AVX-512 BF16, no AMX) or no compiler")


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The float32 product rounded once to bf16, as the kernel and oneDNN round."""
    return (x.float() @ w.float().T).to(torch.bfloat16)


@runs_here
@pytest.mark.parametrize("k", [576, 1536, 32, 50, 7])  # whole 32-pair blocks, a tail, a tail alone
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_the_kernel_computes_x_times_w_transposed(m, k):
    torch.manual_seed(m * 1000 + k)
    x, w = torch.randn(m, k).to(torch.bfloat16), torch.randn(37, k).to(torch.bfloat16)
    got, want = bf16_rows.matmul(x, bf16_rows.pack(w), 37), _reference(x, w)  # 9 blocks of 4 rows and one more
    assert got.shape == (m, 37) and got.dtype == torch.bfloat16
    # float32 sums in another order, each rounded once: within a bf16 unit of the largest value
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=float(want.abs().max()) * 2 ** -7)


@runs_here
def test_the_kernel_refuses_what_it_does_not_compute():
    w = bf16_rows.pack(torch.randn(8, 64).to(torch.bfloat16))
    with pytest.raises(ValueError, match="bf16 x"):
        bf16_rows.matmul(torch.randn(1, 64), w, 8)  # float32 input
    with pytest.raises(ValueError, match="bf16 x"):
        bf16_rows.matmul(torch.randn(5, 64).to(torch.bfloat16), w, 8)  # more rows than it handles
    with pytest.raises(ValueError, match=r"`pack`ed from \[8, 96\]"):
        bf16_rows.matmul(torch.randn(1, 96).to(torch.bfloat16), w, 8)  # inner sizes differ
    with pytest.raises(ValueError, match=r"`pack`ed from \[4, 64\]"):
        bf16_rows.matmul(torch.randn(1, 64).to(torch.bfloat16), w, 4)  # a weight of other outputs
    with pytest.raises(ValueError, match="`pack`ed"):
        bf16_rows.matmul(torch.randn(1, 64).to(torch.bfloat16), torch.randn(8, 64).to(torch.bfloat16), 8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(66, 48)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(48, 48, True), nn.Linear(48, 16, True), nn.Linear(48, 16, True)
        self.o_proj = nn.Linear(48, 48, False)
        self.head = nn.Linear(48, 66, False)  # 16 blocks of 4 rows and 2 more; 48 inputs: one 32-block and a tail
        self.head.weight = self.embed.weight  # tied, as SmolLM2's


def _pair():
    torch.manual_seed(0)
    plain = Tiny().to(torch.bfloat16).eval()
    packed = Tiny().to(torch.bfloat16).eval()
    packed.load_state_dict(plain.state_dict())
    pack_linears(packed)
    return plain, packed


@runs_here
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
def test_bf16_layers_answer_as_nn_linear_through_either_kernel(rows, threads, monkeypatch):
    plain, packed = _pair()
    assert packed.q_proj.fused.rows is not None and packed.o_proj.rows is not None
    assert packed.head.rows is not None and packed.embed.weight.stride() == (48, 1)  # the tied weight stays whole
    calls = []
    real = bf16_rows.matmul
    monkeypatch.setattr(bf16_rows, "matmul", lambda x, w, n: calls.append(x.shape[0]) or real(x, w, n))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(rows, 48).to(torch.bfloat16)
        with torch.inference_mode():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head"):
                want = getattr(plain, name)(x).float()
                got = getattr(packed, name)(x).float()
                torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * 2 ** -6)
    finally:
        torch.set_num_threads(old)
    # q/k/v as one call (with their biases), o and the head: the kernel only for a few rows on one thread
    assert calls == ([rows] * 3 if rows <= bf16_rows.MAX_ROWS and threads == 1 else [])


def test_without_a_compiler_the_layers_answer_through_onednn(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(bf16_rows, "_tried", False)
    monkeypatch.setattr(bf16_rows, "_kernel", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(bf16_rows, "cpu_supported", lambda: True)
    with caplog.at_level(logging.INFO, logger="loopcord.worker"):
        assert bf16_rows.kernel() is None
    assert "not built" in caplog.text and "oneDNN runs every bf16 GEMM" in caplog.text
    if not onednn_bf16():
        pytest.skip("bf16 layers are laid out for torch.mm on this CPU")
    plain, packed = _pair()
    assert all(m.rows is None for m in packed.modules() if isinstance(m, PackedLinear))
    x = torch.randn(1, 48).to(torch.bfloat16)
    with torch.inference_mode():
        want = plain.o_proj(x).float()
        torch.testing.assert_close(packed.o_proj(x).float(), want, rtol=0, atol=float(want.abs().max()) * 2 ** -6)


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(bf16_rows, "_tried", False)
    monkeypatch.setattr(bf16_rows, "_kernel", None)
    monkeypatch.setenv("LOOPCORD_BF16_ROWS", "0")
    assert bf16_rows.kernel() is None
