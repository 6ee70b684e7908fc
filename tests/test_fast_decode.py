"""The lean decode step (model.fast_decode) computes what the transformers forward computes.

For Llama (SmolLM2's architecture) and Qwen2 (the demo base's), with no adapter and with a
LoRA adapter on every projection: a decode step over ragged rows gives the same logits as
the transformers path (to float rounding) and the same cache contents; the engine's greedy
answers on an adapter equal `generate` with that adapter. What it does not cover (a batch
mixing adapters, a DoRA adapter, an adapter on the embeddings) goes through transformers, and
still answers right.
"""

from __future__ import annotations

import pytest
import torch

from model.adapters import AdapterTable, attach, read_adapter
from model.packed_linear import pack_linears
from model.runner import Runner
from tests.support.engine import ARCHS, make_engine, prompts, reference, run, seq, sharpen
from tests.support.kernels import turn_off_kernels


def _adapter(model, path, seed, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kw.setdefault("target_modules", "all-linear")
    cfg = LoraConfig(r=8, lora_alpha=64, init_lora_weights=False, **kw)
    peft = get_peft_model(model, cfg)
    peft.save_pretrained(str(path))
    return str(path)


def _runners(model, pad):
    return {fast: Runner(model, "cpu", pad, 8, 512, fast_decode=fast) for fast in (True, False)}


def _prefill_then_decode(runner, tok, names, level=False):
    """Prompts of different lengths (`level`: cut to one length) prefilled into slots 0..2, then
    one decode step for all three."""
    ids = prompts(tok)[:3]
    if level:
        ids = [i[:min(map(len, ids))] for i in ids]
    runner.cache_for(max(map(len, ids)) + 8, 3)
    runner.chunk([0, 1, 2], [0, 0, 0], ids, names)
    tokens = torch.tensor([5, 17, 42])
    logits = runner.decode(tokens, [len(i) for i in ids], names)
    return logits, [t.clone() for t in runner.cache.k + runner.cache.v]


def _served(tok, arch, path, ids, n=10, check=None) -> list[list[int]]:
    """Greedy answers of the engine to each prompt, all on the adapter at `path`; `check(engine,
    internal)` runs once the adapter is loaded under its internal name."""
    adapters = AdapterTable()
    engine = make_engine(sharpen(ARCHS[arch](tok)), tok, adapters)
    try:
        internal = adapters.new_internal_name()
        engine.call(lambda: engine.load_adapter(internal, path)).result()
        adapters.publish("x", internal, path)
        if check:
            check(engine, internal)
        return [s.generated for s in run(engine, [seq(p, n, adapter=adapters.acquire("x")) for p in ids])]
    finally:
        engine.stop()


@pytest.fixture(params=["kernels", "no-kernels"])
def kernels(request, monkeypatch):
    """model.bf16_rows' kernels where this CPU runs them, and (no-kernels) as on a CPU where they
    do not: the layers' other layouts and LoRA updates by torch's matmuls."""
    if request.param == "no-kernels":
        turn_off_kernels(monkeypatch)
    return request.param


@pytest.mark.parametrize("rows", ["ragged", "level"])
@pytest.mark.parametrize("weights", ["as-loaded", "packed"])
@pytest.mark.parametrize("adapter", [None, "all-linear", "q-v"], ids=["base", "lora", "lora-on-q-and-v"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_decode_step_matches_the_transformers_forward(tokenizer, tmp_path, arch, adapter, weights, rows,
                                                        kernels):
    """Also with an adapter on some projections only (peft's default for Llama: q and v), where a
    sibling group's update covers some of its columns."""
    model = sharpen(ARCHS[arch](tokenizer))
    if weights == "packed":  # as the engine lays them out on CPU: q/k/v side by side, one GEMM here
        pack_linears(model)
        assert all(layer.self_attn.q_proj.fused is layer.self_attn.v_proj.fused is not None
                   for layer in model.model.layers)
    names = [None] * 3
    if adapter:
        targets = "all-linear" if adapter == "all-linear" else ["q_proj", "v_proj"]
        path = _adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / "a", seed=3, target_modules=targets)
        model = attach(model, "a", read_adapter(path, None)).eval()
        names = ["a"] * 3
    out = {}
    with torch.inference_mode():
        for fast, runner in _runners(model, tokenizer.pad_token_id).items():
            runner.peft = adapter is not None
            assert (runner._fast_for(names) is not None) == fast
            out[fast] = _prefill_then_decode(runner, tokenizer, names, level=rows == "level")
    (fast_logits, fast_cache), (plain_logits, plain_cache) = out[True], out[False]
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast_logits.argmax(-1), plain_logits.argmax(-1))
    for a, b in zip(fast_cache, plain_cache):  # (2e-5 apart on an AVX2 CPU: q/k/v as one GEMM or three)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_an_adapter_loaded_again_under_the_same_name_answers_with_its_new_weights(tokenizer, tmp_path, dtype,
                                                                                   kernels):
    """The lean loop keeps each adapter's updates laid out for its kernels: deleting an adapter and
    loading other weights under the same name (with no step between) must not answer with the
    old ones (the engine names each version afresh; this is the stricter case)."""
    arch = "llama"
    paths = [_adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / f"a{seed}", seed=seed) for seed in (3, 4)]
    model = sharpen(ARCHS[arch](tokenizer)).to(dtype)
    pack_linears(model)
    runner = Runner(model, "cpu", tokenizer.pad_token_id, 8, 512)
    logits = []
    with torch.inference_mode():
        for path in paths:
            if runner.peft:
                runner.model.delete_adapter("a")
            runner.model = attach(runner.model, "a", read_adapter(path, None)).eval()
            runner.peft = True
            runner.forget_adapter_state()
            logits.append(_prefill_then_decode(runner, tokenizer, ["a"] * 3)[0].float())
        plain = Runner(runner.model, "cpu", tokenizer.pad_token_id, 8, 512, fast_decode=False)
        plain.peft = True
        want = _prefill_then_decode(plain, tokenizer, ["a"] * 3)[0].float()
    scale = float(want.abs().max())
    tol = (1e-4 if dtype == torch.float32 else 0.03) * scale  # bf16: as the other bf16 comparisons here
    assert float((logits[0] - want).abs().max()) > 3 * tol  # the two adapters answer apart
    torch.testing.assert_close(logits[1], want, rtol=0, atol=tol)
    # The same greedy token wherever the top two are further apart than the tolerance (bf16 rows
    # can tie within it: such a position may go either way on another CPU).
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * tol
    assert clear.any() and torch.equal(logits[1].argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul-attention", "sdpa-attention"])
@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bfloat16_weights_are_laid_out_for_this_cpu_and_decode_as_transformers_does(tokenizer, tmp_path, arch,
                                                                                   adapter, sdpa, threads):
    """worker.dtype bfloat16 on CPU: every projection and the head in bf16_rows' layout where its
    kernels run (AVX-512 BF16 without AMX; on one thread or two), else in oneDNN's
    blocked layout where oneDNN has bf16 kernels, `torch.mm`'s where it has none (an AVX2-only CPU,
    where oneDNN refuses a bf16 weight); a decode step over ragged rows, on the base
    or on a LoRA adapter (peft keeps its weights in float32), after a lean prefill, gives the
    as-loaded bf16 model's logits through transformers (to bf16 rounding) and the same greedy tokens,
    with decode attention through either kernel (SDPA where the CPU has AMX, matmuls elsewhere)."""
    from model import bf16_rows
    from model.packed_linear import Layout, PackedLinear, onednn_bf16

    models = {packed: sharpen(ARCHS[arch](tokenizer)).to(torch.bfloat16) for packed in (True, False)}
    assert pack_linears(models[True]) > 0
    layers = [m for m in models[True].modules() if isinstance(m, PackedLinear)]
    layout = Layout.ROWS if bf16_rows.runs_here() else Layout.ONEDNN if onednn_bf16() else Layout.TRANSPOSED
    assert (layout is Layout.ROWS) == (bf16_rows.kernel() is not None)
    assert layers and all(m.layout is layout for m in layers)
    for layer in models[True].model.layers:  # siblings of one input as one weight
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.fused is attn.k_proj.fused is attn.v_proj.fused is not None
        assert attn.q_proj.fused.weight.dtype == torch.bfloat16 and attn.o_proj.packed.dtype == torch.bfloat16
        if layout.stacked:  # stacked in one weight (side by side for torch.mm: q/k/v only)
            assert mlp.gate_proj.fused is mlp.up_proj.fused is not None
    names = [None] * 3
    if adapter:
        path = _adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / "a", seed=3)
        models = {k: attach(m, "a", read_adapter(path, None)).eval() for k, m in models.items()}
        names = ["a"] * 3
    out = {}
    with torch.inference_mode():
        for packed, model in models.items():
            runner = Runner(model, "cpu", tokenizer.pad_token_id, 8, 512, fast_decode=packed)
            runner.peft = adapter
            assert (runner._fast_for(names) is not None) == packed
            if packed:
                runner.fast.cpu_bf16_sdpa = sdpa
            out[packed] = _prefill_then_decode(runner, tokenizer, names)[0].float()
    # two bf16 roundings of one computation: on these models each path's largest logit error
    # against float32 is ~3% of the scale (mean 0.3-0.5%), so they agree to 3% of it
    scale = out[False].abs().max()
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=0.03 * float(scale))
    assert torch.equal(out[True].argmax(-1), out[False].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_prompt_fed_in_chunks_of_one_row_matches_the_transformers_forward(tokenizer, tmp_path, arch, adapter,
                                                                           dtype):
    """One prompt fed into slot 1 in three chunks (several tokens from position 0, several after
    earlier keys and values, as a prefix-cache hit or a long prompt goes on, then one token) runs
    the lean loop and gives the transformers forward's logits after each chunk, the same keys and
    values in the cache, and the same logits on the decode step after it."""
    model = sharpen(ARCHS[arch](tokenizer)).to(dtype)
    pack_linears(model)  # as the engine lays the weights out on CPU
    name = None
    if adapter:
        path = _adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / "a", seed=4)
        model = attach(model, "a", read_adapter(path, None)).eval()
        name = "a"
    ids = prompts(tokenizer)[1]
    cuts = [0, 5, len(ids) - 1, len(ids)]
    out = {}
    with torch.inference_mode():
        for fast, runner in _runners(model, tokenizer.pad_token_id).items():
            runner.peft = adapter
            assert (runner._fast_for([name]) is not None) == fast
            lean = []
            if fast:  # see that the chunks take the lean loop
                prefill = runner.fast.prefill
                runner.fast.prefill = lambda *a, **k: lean.append(1) or prefill(*a, **k)
            runner.cache_for(len(ids) + 4, 2)
            logits = [runner.chunk([1], [a], [ids[a:b]], [name]) for a, b in zip(cuts, cuts[1:])]
            assert len(lean) == (3 if fast else 0)
            logits.append(runner.decode(torch.tensor([3, 42]), [0, len(ids)], [name, name])[1:])
            out[fast] = ([x.float() for x in logits],
                         [t[1, :, :len(ids) + 1].float().clone() for t in runner.cache.k + runner.cache.v])
    (fast_logits, fast_cache), (plain_logits, plain_cache) = out[True], out[False]
    for a, b in zip(fast_logits, plain_logits):
        assert a.shape == b.shape == (1, b.shape[-1])
        tol = 1e-4 if dtype == torch.float32 else 0.02 * float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
        # the same greedy token, or (bf16) one the transformers logits score within rounding of theirs
        assert b[0, a.argmax()] >= b.max() - 2 * tol
    for a, b in zip(fast_cache, plain_cache):  # a few units in the last place of the layer's largest value
        tol = (4e-6 if dtype == torch.float32 else 0.05) * float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_answers_on_an_adapter_match_generate(tokenizer, tmp_path, arch):
    from peft import PeftModel

    path = _adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / "a", seed=5)
    with_adapter = PeftModel.from_pretrained(sharpen(ARCHS[arch](tokenizer)), path).eval()
    ids = prompts(tokenizer)
    expected = [reference(with_adapter, p, 10) for p in ids]
    assert expected != [reference(sharpen(ARCHS[arch](tokenizer)), p, 10) for p in ids]  # the adapter matters

    def fast_path_on(engine, internal):
        assert engine.runner._fast_for([internal] * len(ids)) is not None

    assert _served(tokenizer, arch, path, ids, check=fast_path_on) == expected


def test_what_it_does_not_cover_goes_through_transformers(tokenizer, tmp_path):
    from peft import PeftModel

    arch = "llama"
    dora = _adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / "dora", seed=7, use_dora=True)
    lora = _adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / "lora", seed=8)
    model = attach(sharpen(ARCHS[arch](tokenizer)), "dora", read_adapter(dora, None))
    model = attach(model, "plain", read_adapter(lora, None)).eval()
    runner = Runner(model, "cpu", tokenizer.pad_token_id, 8, 512)
    runner.peft = True
    assert runner._fast_for(["dora"] * 2) is None  # DoRA: not plain LoRA
    assert runner._fast_for(["plain", "dora"]) is None  # a mixed batch
    assert runner._fast_for(["plain"] * 2) is not None and runner._fast_for([None] * 2) is not None
    # and the engine answers the DoRA adapter exactly as generate does
    with_dora = PeftModel.from_pretrained(sharpen(ARCHS[arch](tokenizer)), dora).eval()
    p = prompts(tokenizer)[1]
    assert _served(tokenizer, arch, dora, [p]) == [reference(with_dora, p, 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_dora_adapter_on_packed_weights_scores_as_on_the_loaded_ones(tokenizer, tmp_path, arch, dtype):
    """DoRA reads its base layer's weight on every forward: on CPU layers packed for their GEMM
    (a stub in `weight`) the adapter's logits were off by ~4% of their scale while greedy answers
    of a tiny model could still agree; each layer DoRA wraps now gets its weight back."""
    path = _adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / "dora", seed=7, use_dora=True)
    logits = {}
    for packed in (False, True):
        model = sharpen(ARCHS[arch](tokenizer)).to(dtype)
        if packed:
            pack_linears(model)
        model = attach(model, "dora", read_adapter(path, None)).eval()
        with torch.inference_mode():
            logits[packed] = model(input_ids=torch.tensor([prompts(tokenizer)[1]])).logits.float()
    scale = float(logits[False].abs().max())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=tolerance * scale)


def test_an_adapter_on_the_embeddings_goes_through_transformers(tokenizer, tmp_path):
    from peft import PeftModel

    arch = "qwen2"
    path = _adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / "emb", seed=9,
                    target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = attach(sharpen(ARCHS[arch](tokenizer)), "emb", read_adapter(path, None)).eval()
    runner = Runner(model, "cpu", tokenizer.pad_token_id, 8, 512)
    runner.peft = True
    assert runner._fast_for(["emb"] * 2) is None and runner._fast_for([None] * 2) is None
    with_emb = PeftModel.from_pretrained(sharpen(ARCHS[arch](tokenizer)), path).eval()
    p = prompts(tokenizer)[1]
    assert _served(tokenizer, arch, path, [p]) == [reference(with_emb, p, 10)]


def test_a_peft_model_used_as_it_is_answers_with_its_active_adapter(tokenizer, tmp_path):
    """The gate's greedy answers (trainer.generate) drive a PeftModel as it is: the candidate's
    adapter must answer, not the bare base."""
    from peft import PeftModel

    from trainer.encode import prompt_ids
    from trainer.generate import greedy_replies

    arch = "llama"
    path = _adapter(sharpen(ARCHS[arch](tokenizer)), tmp_path / "a", seed=11)
    model = PeftModel.from_pretrained(sharpen(ARCHS[arch](tokenizer)), path).eval()
    messages = [{"role": "user", "content": "the quick brown fox"}]
    ids = prompt_ids(tokenizer, messages)
    with_adapter, bare = reference(model, ids, 10), reference(sharpen(ARCHS[arch](tokenizer)), ids, 10)
    assert with_adapter != bare
    ((text, _),) = greedy_replies(model, tokenizer, [messages], 10)
    # the streamed text holds back a last incomplete UTF-8 character; decode() shows it as U+FFFD
    assert text == tokenizer.decode(with_adapter, skip_special_tokens=True).strip().rstrip("\ufffd")
