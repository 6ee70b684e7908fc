"""The decode engine in-process: exact greedy answers for ragged batches, seeded sampling,
per-request isolation, a cache that admissions do not copy, adapters mixed in one batch.

Both architectures the worker serves go through the same engine: a small random
Llama (SmolLM2's architecture) and a small random Qwen2 (the demo base's).
"""

from __future__ import annotations

import time

import pytest

from model.adapters import AdapterTable
from tests.support.engine import (ARCHS, TIMEOUT_S, greedy_through_eos, make_engine, prompts, random_llama,
                                  random_qwen2, reference, run, seq, settled, sharpen)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_ragged_batch_matches_generate(tokenizer, arch):
    model = sharpen(ARCHS[arch](tokenizer))
    ids = prompts(tokenizer)
    expected = [reference(model, p, 12) for p in ids]
    engine = make_engine(model, tokenizer)
    try:
        together = run(engine, [seq(p) for p in ids])  # ragged prompts prefilled and decoded together
        staggered = [seq(p) for p in ids]  # later requests join a batch that is already decoding
        engine.submit(staggered[0])
        staggered[0].emit.ended.wait(0)
        run(engine, staggered[1:])
        staggered[0].emit.ended.wait(TIMEOUT_S)
        reused = engine.prefix.hits
    finally:
        engine.stop()
    assert reused > 0  # the second round's prompts started from the first round's cached prefixes
    assert [s.generated for s in together] == expected
    assert [s.generated for s in staggered] == expected
    assert all(s.emit.outcome == "done" for s in together + staggered)


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(tokenizer, monkeypatch):
    import model.engine as engine_module

    model = sharpen(random_llama(tokenizer))
    short = prompts(tokenizer)[0]
    long = (prompts(tokenizer)[1] * 12)[:300]
    expected = [reference(model, short, 30), reference(model, long, 6)]
    chunks = []
    real = engine_module.prefill_chunks
    monkeypatch.setattr(engine_module, "prefill_chunks", lambda p: chunks.append(r := real(p, budget=64)) or r)
    engine = make_engine(model, tokenizer)
    try:
        first = seq(short, 30)
        engine.submit(first)
        while not first.generated:
            first.emit.ended.wait(0.01)
        second = run(engine, [seq(long, 6)])[0]
        first.emit.ended.wait(TIMEOUT_S)
    finally:
        engine.stop()
    assert [first.generated, second.generated] == expected
    long_chunks = [c for step in chunks for c in step if c.seq is second]
    assert len(long_chunks) == -(-len(long) // 64)  # fed in budget-sized pieces, one per step


def test_seeded_sampling_is_reproducible_and_seeds_differ(tokenizer):
    model = random_qwen2(tokenizer).eval()  # flat logits: sampling really varies
    p = prompts(tokenizer)[2]
    engine = make_engine(model, tokenizer)
    try:
        a = run(engine, [seq(p, 16, temperature=1.0, seed=7)])[0]
        # the same seed inside a batch with unseeded neighbours
        b, *_ = run(engine, [seq(p, 16, temperature=1.0, seed=7), seq(p, 16, temperature=1.0),
                             seq(p, 16, temperature=0.8, top_p=0.5)])
        c = run(engine, [seq(p, 16, temperature=1.0, seed=8)])[0]
    finally:
        engine.stop()
    assert a.generated == b.generated
    assert a.generated != c.generated


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=1e-300, seed=2**64),
                                 dict(seed=-(2**63) - 1), dict(top_p=float("inf")), dict(temperature=-1.0)])
def test_bad_request_fails_alone_and_frees_everything(tokenizer, tmp_path, bad):
    from benchmarks.serve_bench import make_adapter

    model = sharpen(random_llama(tokenizer))
    ids = prompts(tokenizer)
    expected = [reference(model, p, 12) for p in ids[:2]]
    adapters = AdapterTable()
    path = make_adapter(None, tmp_path / "a", 1, model=model)
    engine = make_engine(model, tokenizer, adapters)
    try:
        internal = adapters.new_internal_name()
        engine.call(lambda: engine.load_adapter(internal, path)).result()
        adapters.publish("a", internal, path)
        good = [seq(p) for p in ids[:2]]
        broken = seq(ids[2], adapter=adapters.acquire("a"), **bad)
        run(engine, [good[0], broken, good[1]])
        assert broken.emit.outcome == "error"
        assert "invalid request" in broken.emit.events[-1][1]
        assert [s.generated for s in good] == expected and all(s.emit.outcome == "done" for s in good)
        assert adapters.holds() == {"a": 0}  # the adapter hold was given back
        assert settled(engine) and engine.slots.free() == engine.max_batch_size
    finally:
        engine.stop()


def test_non_finite_scores_fail_only_that_row(tokenizer, tmp_path):
    """A row whose scores overflow (here: its adapter's weights turned NaN in memory) fails alone."""
    from benchmarks.serve_bench import make_adapter

    model = sharpen(random_llama(tokenizer))
    ids = prompts(tokenizer)
    expected = [reference(model, p, 12) for p in ids[:2]]
    path = make_adapter(None, tmp_path / "a", 1, model=model)
    adapters = AdapterTable()
    engine = make_engine(model, tokenizer, adapters)

    def poison():
        for name, param in engine.model.named_parameters():
            if ".lc1." in name or name.endswith(".lc1.weight"):
                param.data.fill_(float("nan"))

    try:
        engine.call(lambda: engine.load_adapter("lc1", path)).result()
        engine.call(poison).result()
        adapters.publish("nan", "lc1", path)
        good = [seq(p) for p in ids[:2]]
        broken = seq(ids[2], adapter=adapters.acquire("nan"))
        run(engine, [good[0], broken, good[1]])
        after = run(engine, [seq(ids[0])])[0]  # the poisoned slot is clean for its next owner
        assert settled(engine)
    finally:
        engine.stop()
    assert broken.emit.outcome == "error" and "non-finite" in broken.emit.events[-1][1]
    assert [s.generated for s in good] == expected
    assert after.generated == expected[0]
    assert adapters.holds() == {"nan": 0}


def test_admissions_write_in_place_without_copying_the_cache(tokenizer):
    model = sharpen(random_qwen2(tokenizer))
    ids = prompts(tokenizer)
    engine = make_engine(model, tokenizer)
    seen = []
    try:
        first = seq(ids[0], 40)
        engine.submit(first)
        while len(first.generated) < 2:
            first.emit.ended.wait(0.01)
        cache = engine.runner.cache
        seen.append([t.data_ptr() for t in cache.k])
        run(engine, [seq(p, 4) for p in ids[1:]])  # three admissions while `first` decodes
        seen.append([t.data_ptr() for t in cache.k])
        first.emit.ended.wait(TIMEOUT_S)
        assert first.emit.outcome == "done"
    finally:
        engine.stop()
    assert seen[0] == seen[1]  # same storage: nobody's cache was re-allocated or concatenated


def test_cache_budget_holds_requests_back_and_every_answer_is_still_exact(tokenizer):
    """More requests than the KV budget holds: the rest wait their turn, the cache stays under the
    budget, and each answer is the one the request gets alone."""
    model = sharpen(random_llama(tokenizer))
    ids = prompts(tokenizer) * 2
    expected = [reference(model, p, 12) for p in ids]
    engine = make_engine(model, tokenizer, max_batch_size=8)
    cache = engine.runner.empty_cache()
    engine.kv_cache_bytes = cache.bytes_for(4, 64)  # one block of rows at the first capacity step
    most_running, most_bytes = 0, 0
    try:
        batch = [seq(p) for p in ids]
        for s in batch:
            engine.submit(s)
        while not all(s.emit.ended.is_set() for s in batch):
            most_running = max(most_running, engine.running())
            most_bytes = max(most_bytes, cache.nbytes())
            time.sleep(0.001)
    finally:
        engine.stop()
    assert 1 < most_running <= 4  # batched, but never past what the budget holds
    assert 0 < most_bytes <= engine.kv_cache_bytes
    assert [s.generated for s in batch] == expected


def test_cancelled_request_frees_its_slot(tokenizer):
    model = sharpen(random_llama(tokenizer))
    engine = make_engine(model, tokenizer, max_batch_size=1)
    try:
        hog = seq(prompts(tokenizer)[0], 10_000)
        engine.submit(hog)
        while not hog.generated:
            hog.emit.ended.wait(0.01)
        engine.cancel(hog)
        nxt = run(engine, [seq(prompts(tokenizer)[1], 3)])[0]  # only one slot: it must have been freed
    finally:
        engine.stop()
    assert nxt.emit.outcome == "done" and len(nxt.generated) == 3


def test_adapters_mixed_in_one_batch(tokenizer, tmp_path):
    from peft import PeftModel

    from benchmarks.serve_bench import make_adapter

    base = sharpen(random_qwen2(tokenizer))
    paths = [make_adapter(None, tmp_path / name, seed, model=base) for name, seed in (("a", 1), ("b", 2))]
    p = prompts(tokenizer)[1]
    expected = [reference(base, p, 10)]
    for path in paths:
        with_adapter = PeftModel.from_pretrained(sharpen(random_qwen2(tokenizer)), path).eval()
        expected.append(reference(with_adapter, p, 10))
    assert len({tuple(e) for e in expected}) == 3  # the adapters really change the answer
    adapters = AdapterTable()
    engine = make_engine(base, tokenizer, adapters)
    try:
        for name, path in zip("ab", paths):
            internal = adapters.new_internal_name()
            engine.call(lambda: engine.load_adapter(internal, path)).result()
            adapters.publish(name, internal, path)
        batch = [seq(p, 10), seq(p, 10, adapter=adapters.acquire("a")), seq(p, 10, adapter=adapters.acquire("b"))]
        run(engine, batch)
    finally:
        engine.stop()
    assert [s.generated for s in batch] == expected


def test_hot_swap_mid_decode_keeps_running_requests_on_their_version(tokenizer, tmp_path):
    """The worker's hot-swap, in-process: a new version of adapter "a" is loaded between two steps
    while four requests on "a" are decoding. Each of them finishes on the weights it started with,
    token for token (logits sharpened, so a switched row would show), a request admitted after
    the swap answers with the new weights, and the old version leaves the model with its last request."""
    from peft import PeftModel

    from benchmarks.serve_bench import make_adapter

    base = sharpen(random_qwen2(tokenizer))
    paths = {name: make_adapter(None, tmp_path / name, seed, model=base) for name, seed in (("a", 1), ("b", 2))}
    ids, n = prompts(tokenizer), 40
    expected = {}
    for name, path in paths.items():
        with_adapter = PeftModel.from_pretrained(sharpen(random_qwen2(tokenizer)), path).eval()
        expected[name] = [greedy_through_eos(with_adapter, p, n) for p in ids]
    assert all(a != b for a, b in zip(expected["a"], expected["b"]))  # the swap really changes every answer
    adapters = AdapterTable()
    engine = make_engine(base, tokenizer, adapters)

    def load(path):
        internal = adapters.new_internal_name()
        engine.load_adapter(internal, path)
        stale = adapters.publish("a", internal, path)
        if stale:
            engine.delete_adapter(stale)
        return internal

    try:
        first = engine.call(lambda: load(paths["a"])).result()
        running = [seq(p, n, adapter=adapters.acquire("a")) for p in ids]
        for s in running:
            engine.submit(s)
        deadline = time.monotonic() + TIMEOUT_S
        while not all(s.generated for s in running) and time.monotonic() < deadline:
            time.sleep(0.001)

        def swap():  # on the engine thread between two steps, as the worker's load does
            return load(paths["b"]), [len(s.generated) for s in running]

        second, at_swap = engine.call(swap).result()
        after = seq(ids[1], n, adapter=adapters.acquire("a"))
        run(engine, [after])
        for s in running:
            assert s.emit.ended.wait(TIMEOUT_S)
        assert settled(engine)
        versions = set(engine.model.peft_config)
    finally:
        engine.stop()
    assert all(0 < k < n for k in at_swap), at_swap  # every request was mid-answer at the swap
    assert [s.generated for s in running] == expected["a"]
    assert after.generated == expected["b"][1]
    assert all(s.emit.outcome == "done" for s in running + [after])
    assert second in versions and first not in versions  # the old version went with its last request


def test_requests_announced_together_start_together(tokenizer, monkeypatch):
    """The server announces a request while it tokenizes it (`expect`); an idle engine woken by the
    first of a burst waits for the announced rest, so the burst is prefilled as one batch (same
    first-token instant) instead of the first few running a prefill and a decode step ahead of the
    others. A request announced and then refused (`unexpect`) holds nobody up."""
    import model.engine as engine_module

    monkeypatch.setattr(engine_module, "ARRIVAL_WAIT_S", 60.0)  # long enough that only arrivals end it
    model = sharpen(random_llama(tokenizer))
    ids = prompts(tokenizer)
    expected = [reference(model, p, 6) for p in ids[:3]]
    engine = make_engine(model, tokenizer)
    try:
        for _ in range(3):
            engine.expect()
        burst = [seq(p, 6) for p in ids[:3]]
        engine.submit(burst[0], expected=True)
        time.sleep(0.2)
        assert not burst[0].generated  # held for the two still announced
        engine.submit(burst[1], expected=True)
        engine.submit(burst[2], expected=True)
        for s in burst:
            assert s.emit.ended.wait(TIMEOUT_S)
        assert settled(engine)
        engine.expect()
        engine.expect()
        alone = seq(ids[3], 4)
        engine.submit(alone, expected=True)
        engine.unexpect()  # the other one was refused before it reached the engine
        assert alone.emit.ended.wait(TIMEOUT_S)
    finally:
        engine.stop()
    assert [s.generated for s in burst] == expected
    assert len({s.first_token_at for s in burst}) == 1  # one prefill batch gave all three their first token
    assert alone.emit.outcome == "done"


def test_unloading_the_last_adapter_leaves_the_base_answering_as_before(tokenizer, tmp_path):
    """Issue 29: unloading the only adapter made every later request fail (peft looked up the
    deleted adapter's config), the base's included, and loading it again did not help."""
    from benchmarks.serve_bench import make_adapter

    base = sharpen(random_qwen2(tokenizer))
    path = make_adapter(None, tmp_path / "a", 1, model=base)
    p = prompts(tokenizer)[1]
    expected = reference(base, p, 10)
    adapters = AdapterTable()
    engine = make_engine(base, tokenizer, adapters)
    try:
        internal = adapters.new_internal_name()
        engine.call(lambda: engine.load_adapter(internal, path)).result()
        adapters.publish("a", internal, path)
        on_a = run(engine, [seq(p, 10, adapter=adapters.acquire("a"))])[0].generated
        assert on_a != expected
        settled(engine)
        engine.call(lambda: engine.delete_adapter(adapters.unload("a"))).result()
        (after,) = run(engine, [seq(p, 10)])
        assert after.emit.outcome == "done" and after.generated == expected
        internal = adapters.new_internal_name()  # and it can be loaded again
        engine.call(lambda: engine.load_adapter(internal, path)).result()
        adapters.publish("a", internal, path)
        again = run(engine, [seq(p, 10, adapter=adapters.acquire("a")), seq(p, 10)])
        assert [s.generated for s in again] == [on_a, expected]
    finally:
        engine.stop()


def test_health_turns_unhealthy_when_answers_keep_failing_and_recovers(tokenizer, monkeypatch):
    """/health must not say ok while every answer fails (issue 29): requests the model itself
    failed in a row make the engine unhealthy; the next answer that works makes it healthy."""
    from model.engine import UNHEALTHY_AFTER_FAILURES

    engine = make_engine(sharpen(random_qwen2(tokenizer)), tokenizer)
    p = prompts(tokenizer)[0]
    try:
        real = engine.runner.chunk

        def broken(*args, **kw):
            raise RuntimeError("the model is broken")

        monkeypatch.setattr(engine.runner, "chunk", broken)
        for n in range(UNHEALTHY_AFTER_FAILURES):
            assert engine.healthy
            (failed,) = run(engine, [seq(p, 4)])
            assert failed.emit.outcome == "error"
        assert not engine.healthy
        monkeypatch.setattr(engine.runner, "chunk", real)
        (ok,) = run(engine, [seq(p, 4)])
        assert ok.emit.outcome == "done" and engine.healthy
    finally:
        engine.stop()
