"""The bf16 kernel for CPUs with AVX-512 BF16 and no AMX (model.bf16_rows) and the layers laid
out for it (model.packed_linear's Layout.ROWS).

Where it runs (such a CPU, a C compiler), bf16 and float32 layers take its layout, the only
copy, and answer as nn.Linear does, to rounding, at decode and prompt row counts, on one thread
or split across torch's threads (the same numbers either way); where it cannot be built or is
turned off, oneDNN's and torch.mm's layouts as before.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from model import bf16_rows
from model.packed_linear import Layout, PackedLinear, onednn_bf16, pack_linears
from tests.support.engine import prompts
from tests.support.kernels import turn_off_kernels

runs_here = pytest.mark.skipif(bf16_rows.kernel() is None,
                               reason="the kernel does not run on this CPU (needs AVX-512 BF16, no AMX) or no compiler")


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The float32 product rounded once to x's dtype, as the kernels and oneDNN round."""
    return (x.float() @ w.float().T).to(x.dtype)


@runs_here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("k", [576, 1536, 32, 50, 7])  # an odd number of inputs too
@pytest.mark.parametrize("m", [1, 3, 8, 9, 32, 100])  # within one chunk of 8 rows, across chunks
def test_the_kernel_computes_x_times_w_transposed(m, k, dtype):
    torch.manual_seed(m * 1000 + k)
    x, w = torch.randn(m, k).to(dtype), torch.randn(37, k).to(dtype)
    packed = bf16_rows.pack(w)
    got, want = bf16_rows.matmul(x, packed, 37), _reference(x, w)  # a panel of 32 outputs, one of 16 with 5
    assert got.shape == (m, 37) and got.dtype == dtype
    # float32 sums in another order (each rounded once to bf16): within a unit of the largest value
    unit = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -16  # float32: sums of up to 1536 terms
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=float(want.abs().max()) * unit)
    assert torch.equal(bf16_rows.unpack(packed, 37, k), w)  # the layout loses nothing


@runs_here
def test_the_kernel_refuses_what_it_does_not_compute():
    w = bf16_rows.pack(torch.randn(8, 64).to(torch.bfloat16))
    with pytest.raises(ValueError, match="one dtype"):
        bf16_rows.matmul(torch.randn(1, 64), w, 8)  # float32 input, bf16 weight
    with pytest.raises(ValueError, match="one dtype"):
        bf16_rows.matmul(torch.randn(0, 64).to(torch.bfloat16), w, 8)  # no rows
    with pytest.raises(ValueError, match="bf16 or float32"):
        bf16_rows.pack(torch.randn(8, 64).to(torch.float16))
    with pytest.raises(ValueError, match=r"`pack`ed from \[8, 96\]"):
        bf16_rows.matmul(torch.randn(1, 96).to(torch.bfloat16), w, 8)  # inner sizes differ
    with pytest.raises(ValueError, match=r"`pack`ed from \[40, 64\]"):
        bf16_rows.matmul(torch.randn(1, 64).to(torch.bfloat16), w, 40)  # a weight of other outputs
    with pytest.raises(ValueError, match="`pack`ed"):
        bf16_rows.matmul(torch.randn(1, 64).to(torch.bfloat16), torch.randn(8, 64).to(torch.bfloat16), 8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(66, 48)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(48, 48, True), nn.Linear(48, 16, True), nn.Linear(48, 16, True)
        self.o_proj = nn.Linear(48, 48, False)
        self.head = nn.Linear(48, 66, False)  # two panels of 32 outputs and one of 16 holding 2
        self.head.weight = self.embed.weight  # tied, as SmolLM2's


def _pair(threads: int, dtype=torch.bfloat16):
    torch.manual_seed(0)
    plain = Tiny().to(dtype).eval()
    packed = Tiny().to(dtype).eval()
    packed.load_state_dict(plain.state_dict())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pack_linears(packed)
    finally:
        torch.set_num_threads(old)
    return plain, packed


def _answers_as_nn_linear(plain, packed, rows: int) -> None:
    x = torch.randn(rows, 48).to(plain.o_proj.weight.dtype)
    with torch.inference_mode():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head"):
            want = getattr(plain, name)(x).float()
            got = getattr(packed, name)(x).float()
            torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * 2 ** -6)


@runs_here
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("rows", [1, 5, 32, 100])
def test_layers_take_the_kernels_layout_and_answer_as_nn_linear(rows, dtype, threads, monkeypatch):
    plain, packed = _pair(threads=threads, dtype=dtype)
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.layout is Layout.ROWS for m in layers)
    group = packed.q_proj.fused
    assert group is packed.k_proj.fused is packed.v_proj.fused and group.layout is Layout.ROWS
    assert packed.embed.weight.stride() == (48, 1)  # the tied head's weight stays whole for the embedding
    calls = []
    real = bf16_rows.matmul
    monkeypatch.setattr(bf16_rows, "matmul", lambda x, w, n: calls.append(x.shape[0]) or real(x, w, n))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _answers_as_nn_linear(plain, packed, rows)
    finally:
        torch.set_num_threads(old)
    assert calls == [rows] * 3  # q/k/v as one call (with their biases), o, the head
    # the weight as nn.Linear holds it, for code that reads it (peft's DoRA)
    for name in ("q_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(packed, name).dense_weight(), getattr(plain, name).weight)


@runs_here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
def test_torchs_threads_split_the_work_and_compute_the_same_numbers(dtype):
    """The kernels share torch's OpenMP threads (one runtime in the process, the libgomp torch
    loaded; where a second one was loaded beside it, each call runs on one thread), split a
    call's panels (attention: its rows and key/value heads; LoRA: its rows) across as many as
    torch uses, and give bit for bit what one thread gives."""
    shared = len(bf16_rows._openmp_runtimes()) == 1  # else (a second runtime beside torch's) one thread each call
    torch.manual_seed(5)
    n, k = 200, 72  # 7 panels: split unevenly
    w = (torch.randn(n, k) * 0.1).to(dtype)
    packed = bf16_rows.pack(w)
    q = torch.randn(6, 9, 64).to(torch.bfloat16)
    kc, vc = torch.randn(2, 6, 3, 50, 64).to(torch.bfloat16).unbind(0)
    lengths = torch.tensor([1, 50, 7, 33, 20, 49], dtype=torch.int32)
    lora = bf16_rows.lora_pack(torch.randn(8, k), torch.randn(8, n))
    old = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert bf16_rows.threads() == (threads if shared else 1)
            out[threads] = [bf16_rows.matmul(torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype),
                                             packed, n) for m in (1, 9, 40)]
            out[threads].append(bf16_rows.attention(q, kc, vc, lengths, 50, 0.125))
            lora_out = torch.zeros(9, n, dtype=dtype)
            bf16_rows.lora_add(torch.ones(9, k, dtype=dtype), *lora, n, lora_out)
            out[threads].append(lora_out)
    finally:
        torch.set_num_threads(old)
    for one, two in zip(out[1], out[2]):
        assert torch.equal(one, two)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(40)).to(dtype)
    torch.testing.assert_close(out[2][2].float(), _reference(x, w).float(), rtol=0,
                               atol=float(_reference(x, w).float().abs().max()) * 2 ** -7)
    torch.testing.assert_close(out[2][3].float(), _attention_reference(q, kc, vc, lengths, 0.125),
                               rtol=2 ** -7, atol=2 ** -8)
    assert out[2][4].abs().min() > 0  # every row and output written


def test_without_a_compiler_the_layers_answer_through_onednn(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(bf16_rows, "_tried", False)
    monkeypatch.setattr(bf16_rows, "_kernel", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(bf16_rows, "cpu_supported", lambda: True)
    with caplog.at_level(logging.INFO, logger="loopcord.worker"):
        assert bf16_rows.kernel() is None
    assert "not built" in caplog.text and "oneDNN and torch.mm run every GEMM" in caplog.text
    if not onednn_bf16():
        pytest.skip("bf16 layers are laid out for torch.mm on this CPU")
    plain, packed = _pair(threads=1)
    assert all(m.layout is Layout.ONEDNN for m in packed.modules() if isinstance(m, PackedLinear))
    _answers_as_nn_linear(plain, packed, 1)


def test_the_kernel_can_be_turned_off_and_layers_keep_the_onednn_and_torch_mm_layouts(monkeypatch):
    turn_off_kernels(monkeypatch)
    assert bf16_rows.kernel() is None
    plain, packed = _pair(threads=2, dtype=torch.float32)
    assert all(m.layout is Layout.TRANSPOSED for m in packed.modules() if isinstance(m, PackedLinear))  # none widens
    _answers_as_nn_linear(plain, packed, 3)
    if not onednn_bf16():
        pytest.skip("bf16 layers are laid out for torch.mm on this CPU")
    plain, packed = _pair(threads=1)
    assert all(m.layout is Layout.ONEDNN for m in packed.modules() if isinstance(m, PackedLinear))
    _answers_as_nn_linear(plain, packed, 3)


def _attention_reference(q, kc, vc, lengths, scale):
    """Row i's query heads over its first lengths[i] positions, in float32 (SDPA per row)."""
    import torch.nn.functional as F

    rows = []
    for i, length in enumerate(lengths.tolist()):
        o = F.scaled_dot_product_attention(q[i:i + 1, :, None].float(), kc[i:i + 1, :, :length].float(),
                                           vc[i:i + 1, :, :length].float(), scale=scale,
                                           enable_gqa=kc.shape[1] != q.shape[1])
        rows.append(o.reshape(-1))
    return torch.stack(rows)


@runs_here
@pytest.mark.parametrize("heads,kv_heads,hd", [(9, 3, 64), (14, 2, 64), (4, 4, 32), (28, 4, 128)])
def test_the_attention_kernel_attends_each_row_to_its_own_positions(heads, kv_heads, hd):
    torch.manual_seed(heads + hd)
    n, capacity = 5, 70
    kc, vc = torch.randn(8, kv_heads, capacity, hd).to(torch.bfloat16), torch.randn(8, kv_heads, capacity, hd).to(torch.bfloat16)
    q = (torch.randn(n, heads, hd) * 2).to(torch.bfloat16)
    lengths = torch.tensor([1, 17, 16, 33, 64], dtype=torch.int32)  # one position, a vector's width and not
    got = bf16_rows.attention(q, kc, vc, lengths, 64, hd ** -0.5)
    want = _attention_reference(q, kc, vc, lengths, hd ** -0.5)
    assert got.shape == (n, heads * hd) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=2 ** -8)
    # positions past a row's length do not count: other values there change nothing
    kc[:, :, 64:], vc[:, :, 64:] = 100.0, -100.0
    kc[0, :, 1:], vc[0, :, 1:] = 100.0, -100.0
    torch.testing.assert_close(bf16_rows.attention(q, kc, vc, lengths, 64, hd ** -0.5), got, rtol=0, atol=0)


@runs_here
def test_the_attention_kernel_refuses_shapes_it_does_not_take():
    kc = torch.zeros(2, 2, 8, 48).to(torch.bfloat16)
    assert not bf16_rows.attention_covers(4, 2, 48) and not bf16_rows.attention_covers(18, 2, 64)
    with pytest.raises(ValueError, match="bf16 q"):
        bf16_rows.attention(torch.zeros(2, 4, 48).to(torch.bfloat16), kc, kc, torch.ones(2, dtype=torch.int32), 1, 1.0)
    kc = torch.zeros(2, 2, 8, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="longest 9"):  # longer than the cache holds
        bf16_rows.attention(torch.zeros(2, 4, 64).to(torch.bfloat16), kc, kc, torch.ones(2, dtype=torch.int32), 9, 1.0)
    with pytest.raises(ValueError, match="bf16 q"):  # float32 query
        bf16_rows.attention(torch.zeros(2, 4, 64), kc, kc, torch.ones(2, dtype=torch.int32), 1, 1.0)
    with pytest.raises(RuntimeError, match="outside 0..3"):  # a row longer than the longest given
        bf16_rows.attention(torch.zeros(2, 4, 64).to(torch.bfloat16), kc, kc,
                            torch.tensor([3, 4], dtype=torch.int32), 3, 1.0)


@runs_here
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["into-bf16", "into-float32"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16-input", "float32-input"])
@pytest.mark.parametrize("n,k,r,outs", [(1, 576, 24, 960), (5, 100, 7, 33), (9, 1536, 8, 576), (6, 70, 1, 130)])
def test_the_lora_kernel_adds_peft_s_float32_update_in_place(n, k, r, outs, x_dtype, out_dtype):
    """out += (x @ A.T) @ Bt in float32, the sum rounded once to out's dtype, as peft adds a
    float32 adapter's update; into a column slice of a wider output (a sibling's columns), the
    columns beside it untouched; ranks and widths not multiples of the kernel's 4 and 64."""
    torch.manual_seed(n + r)
    x = torch.randn(n, k).to(x_dtype)
    a, bt = torch.randn(r, k) * 0.1, torch.randn(r, outs) * 0.1
    wide = torch.randn(n, outs + 10).to(out_dtype)
    before = wide.clone()
    want = (wide[:, 3:3 + outs].float() + (x.float() @ a.T) @ bt).to(out_dtype).float()
    bf16_rows.lora_add(x, *bf16_rows.lora_pack(a, bt), outs, wide[:, 3:3 + outs])
    scale = float(want.abs().max())
    torch.testing.assert_close(wide[:, 3:3 + outs].float(), want, rtol=0,
                               atol=scale * (2 ** -7 if out_dtype == torch.bfloat16 else 1e-5))
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 3 + outs:], before[:, 3 + outs:])


@runs_here
def test_the_lora_kernel_refuses_what_it_does_not_compute():
    a, bt = bf16_rows.lora_pack(torch.randn(4, 32), torch.randn(4, 16))
    x, out = torch.randn(2, 32), torch.zeros(2, 16)
    with pytest.raises(ValueError, match="lora_pack"):  # not laid out
        bf16_rows.lora_add(x, torch.randn(4, 32), torch.randn(4, 16), 16, out)
    with pytest.raises(ValueError, match="lora_pack"):  # packed for another width
        bf16_rows.lora_add(x, a, bt, 80, torch.zeros(2, 80))
    with pytest.raises(ValueError, match="lora_pack"):  # float16
        bf16_rows.lora_add(x.half(), a, bt, 16, out)
    big = bf16_rows.lora_pack(torch.randn(bf16_rows.MAX_LORA_RANK + 1, 32), torch.randn(bf16_rows.MAX_LORA_RANK + 1, 16))
    with pytest.raises(ValueError, match="lora_pack"):
        bf16_rows.lora_add(x, *big, 16, out)
    assert torch.equal(out, torch.zeros(2, 16))


@runs_here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("n,d", [(1, 576), (5, 100), (33, 896)])
def test_the_norm_kernel_adds_the_residual_and_normalises_as_the_model_does(n, d, dtype):
    """h += delta in place (rounded as torch's add), then RMSNorm as Llama's and Qwen2's modules
    compute it (bf16: normalised in float32, rounded, times the weight); without delta, the norm."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(n + d)
    norm = LlamaRMSNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) + 0.5)
    norm = norm.to(dtype)
    h, delta = (torch.randn(n, d) * 3).to(dtype), torch.randn(n, d).to(dtype)
    summed = h + delta
    with torch.inference_mode():
        want = norm(summed).float()
    got = bf16_rows.add_rms_norm(h, delta, norm.weight.detach(), 1e-5)
    assert torch.equal(h, summed)
    # bf16: at most one rounding step apart where the float32 sums' order differs
    atol = float(want.abs().max()) * (2 ** -7 if dtype == torch.bfloat16 else 1e-6)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=atol)
    torch.testing.assert_close(bf16_rows.add_rms_norm(summed.clone(), None, norm.weight.detach(), 1e-5).float(), want,
                               rtol=0, atol=atol)
    assert not torch.equal(got.float(), F.rms_norm(summed.float(), (d,), eps=1e-5))  # the weight applied
    with pytest.raises(ValueError, match="one dtype"):
        bf16_rows.add_rms_norm(h, delta.half(), norm.weight.detach(), 1e-5)


@runs_here
@pytest.mark.parametrize("heads,kv_heads,hd", [(9, 3, 64), (4, 4, 32), (14, 2, 128)])
def test_the_rotary_kernel_turns_queries_and_keys_and_stores_keys_and_values(heads, kv_heads, hd):
    """As the lean loop's torch path (x * cos + cat(x2, x1) * sin, rounded as torch's mul and
    addcmul), from q/k/v's outputs side by side in a strided row; each row's key and value land at
    its own position of its own cache row, nothing else written."""
    torch.manual_seed(heads + hd)
    n, half = 5, hd // 2
    wide = torch.randn(n, (heads + 2 * kv_heads) * hd + 7).to(torch.bfloat16)
    qkv = wide[:, :(heads + 2 * kv_heads) * hd]
    cos, sin = torch.randn(n, hd).to(torch.bfloat16), torch.randn(n, hd).to(torch.bfloat16)
    sin = torch.cat((-sin[:, :half], sin[:, half:]), -1)
    positions = torch.tensor([3, 0, 7, 7, 1])
    kc, vc = torch.zeros(8, kv_heads, 10, hd).to(torch.bfloat16), torch.zeros(8, kv_heads, 10, hd).to(torch.bfloat16)
    q = bf16_rows.rotary_store(qkv, heads, kv_heads, cos, sin, positions, kc, vc)
    qk = qkv[:, :(heads + kv_heads) * hd].reshape(n, heads + kv_heads, hd)
    turned = torch.addcmul(qk * cos[:, None], qk.roll(half, -1), sin[:, None])
    want_k, want_v = torch.zeros_like(kc), torch.zeros_like(vc)
    want_k[torch.arange(n), :, positions] = turned[:, heads:]
    want_v[torch.arange(n), :, positions] = qkv[:, (heads + kv_heads) * hd:].reshape(n, kv_heads, hd)
    assert torch.equal(q, turned[:, :heads]) and torch.equal(kc, want_k) and torch.equal(vc, want_v)
    with pytest.raises(RuntimeError, match="outside 0..9"):
        bf16_rows.rotary_store(qkv, heads, kv_heads, cos, sin, torch.tensor([3, 0, 10, 7, 1]), kc, vc)


def _model(arch: str, tok, dtype=torch.bfloat16):
    """A Llama or Qwen2 of head size 32 (the attention kernel's smallest), logits sharpened."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from devkit.tiny_model import build_model

    dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    torch.manual_seed(3)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=512,
                                             tie_word_embeddings=True, **dims))
    else:
        model = build_model(tok, seed=3, **dims)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    return model.to(dtype).eval()


@runs_here
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_model_decodes_through_the_kernels_as_transformers_does(arch, dtype, threads, tokenizer):
    """A model whose head size the attention kernel takes (32), on one thread or two: the lean
    prefill and a ragged decode step (GEMMs in bf16_rows; in bf16 attention too) give the
    transformers forward's logits to rounding and its greedy tokens."""
    from model.runner import Runner

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for fast in (True, False):
            model = _model(arch, tokenizer, dtype)
            if fast:
                pack_linears(model)
                assert model.model.layers[0].self_attn.o_proj.layout is Layout.ROWS
            runner = Runner(model, "cpu", tokenizer.pad_token_id, 8, 256, fast_decode=fast)
            if fast:
                assert runner.fast.bf16_kernel_attention
            ids = prompts(tokenizer)[:3]
            with torch.inference_mode():
                runner.cache_for(max(map(len, ids)) + 8, 3)
                runner.chunk([0, 1, 2], [0, 0, 0], ids, [None] * 3)
                out[fast] = runner.decode(torch.tensor([5, 17, 42]), [len(i) for i in ids], [None] * 3).float()
    finally:
        torch.set_num_threads(old)
    # 0.08% of the scale apart here (float32 attention against transformers' bf16 products); one
    # position left out of a row's attention moves them 2%
    scale = out[False].abs().max()
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=0.005 * float(scale))
    assert torch.equal(out[True].argmax(-1), out[False].argmax(-1))
