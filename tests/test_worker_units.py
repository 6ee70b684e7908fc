"""The worker's pure pieces: streaming text, stop strings, adapter versions, request checks."""

from __future__ import annotations

import json

import pytest

from model.adapters import AdapterInUse, AdapterTable, check_adapter_dir, read_adapter
from model.detokenize import IncrementalDetokenizer, StopStrings
from model.errors import APIError
from model.protocol import check_context, parse_chat_request, system_fingerprint


def test_incremental_detokenizer_releases_only_whole_characters(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    text = "春天来了，你好！Grüße 🌸 naïve café 東京"
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in tok(text, add_special_tokens=False)["input_ids"]] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 3  # it really streamed, not one blob at the end


def feed_all(stops, deltas):
    s = StopStrings(stops)
    out = [s.feed(d) for d in deltas]
    return out, s.flush(), s.stopped


def test_stop_string_split_across_deltas_never_leaks():
    out, tail, stopped = feed_all(["</end>"], ["Hello </", "en", "d> more"])
    assert "".join(out) + tail == "Hello " and stopped
    assert "</" not in "".join(out)


def test_held_prefix_is_released_when_it_is_not_a_stop():
    out, tail, stopped = feed_all(["STOP"], ["ab ST", "x", "y"])
    assert "".join(out) + tail == "ab STxy" and not stopped
    out, tail, stopped = feed_all(["STOP"], ["ab ST"])  # generation ended with a partial stop
    assert out == ["ab "] and tail == "ST"


def test_earliest_of_several_stops_wins():
    out, tail, stopped = feed_all(["world", "lo"], ["hello world"])
    assert out == ["hel"] and stopped


def test_swapped_adapter_is_deleted_only_after_its_last_request():
    table = AdapterTable()
    v1 = table.new_internal_name()
    assert table.publish("me", v1, "/a1") is None
    held = table.acquire("me")
    v2 = table.new_internal_name()
    assert table.publish("me", v2, "/a2") is None  # v1 still in use: not deleted yet
    assert table.acquire("me").internal == v2  # new requests get the new version
    assert table.release(held) is True  # last user of v1 gone: delete it now
    assert table.paths() == {"me": "/a2"}


def test_unload_refused_while_a_request_holds_it():
    table = AdapterTable()
    table.publish("me", table.new_internal_name(), "/a")
    held = table.acquire("me")
    with pytest.raises(AdapterInUse):
        table.unload("me")
    table.release(held)
    assert table.unload("me").startswith("lc") and "me" not in table
    with pytest.raises(KeyError):
        table.unload("me")


def test_adapter_dir_checks_name_the_problem(tmp_path):
    with pytest.raises(APIError, match="not a directory"):
        check_adapter_dir(str(tmp_path / "nope"), {})
    with pytest.raises(APIError, match="adapter_config.json is missing"):
        check_adapter_dir(str(tmp_path), {})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(APIError, match="not a LoRA adapter"):
        check_adapter_dir(str(tmp_path), {})
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(APIError, match="not valid JSON"):
        check_adapter_dir(str(tmp_path), {})


def test_fingerprint_names_the_adapter_files_not_where_or_when_they_were_loaded(tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file

    first = tmp_path / "first"
    first.mkdir()
    (first / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.layer.lora_A.weight": torch.ones(2, 3)}, first / "adapter_model.safetensors")
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    digest = read_adapter(str(first), None).digest
    assert read_adapter(str(copy), None).digest == digest  # the same files elsewhere: the same version
    save_file({"base_model.model.layer.lora_A.weight": torch.ones(2, 3) * 2}, copy / "adapter_model.safetensors")
    assert read_adapter(str(copy), None).digest != digest  # retrained weights
    shutil.copy(first / "adapter_model.safetensors", copy)
    (copy / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 8}))
    assert read_adapter(str(copy), None).digest != digest  # same weights, another scale
    base = system_fingerprint("/models/base", "bfloat16", None)
    with_adapter = system_fingerprint("/models/base", "bfloat16", digest)
    assert base.startswith("fp_") and with_adapter.startswith("fp_")
    assert len({base, with_adapter, system_fingerprint("/models/base", "float32", digest),
                system_fingerprint("/models/other", "bfloat16", digest)}) == 4
    assert system_fingerprint("/models/base", "bfloat16", digest) == with_adapter  # nothing per process


def test_request_parsing_accepts_openai_shapes_and_names_bad_params():
    req = parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                              "stop": "x", "max_completion_tokens": 5, "stream": True})
    assert req.messages == [{"role": "user", "content": "hi"}] and req.stop == ["x"] and req.max_tokens == 5
    for body, param in (({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
                        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "seed")):
        with pytest.raises(APIError) as err:
            parse_chat_request(body)
        assert err.value.status == 400 and err.value.param == param


def test_context_check_reports_counts_and_defaults_to_the_rest():
    assert check_context(100, None, 2048) == 1948
    with pytest.raises(APIError, match="2048.*2100.*100.*2000"):
        check_context(100, 2000, 2048)


@pytest.mark.parametrize("native", [True, False])
def test_worker_dtype_auto_serves_bf16_where_the_cpu_computes_it(monkeypatch, caplog, native):
    """`worker.dtype: auto`: bf16 on a GPU and on a CPU with native bf16, float32 on other CPUs;
    an explicit dtype is served as asked, with a warning where bf16 would be emulated; the
    trainer's rule (resolve_dtype) stays float32 on CPU."""
    import torch

    from model import loading

    monkeypatch.setattr(loading, "cpu_native_bf16", lambda: native)
    assert loading.serving_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert loading.serving_dtype("auto", "cuda:0") == "bfloat16"
    assert loading.serving_dtype("float32", "cpu") == "float32"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert loading.serving_dtype("bfloat16", "cpu") == "bfloat16"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warned) is not native and all("without native bf16" in w and "float32" in w for w in warned)
    assert loading.resolve_dtype("auto", "cpu") == torch.float32


def test_a_base_served_with_dtype_auto_loads_in_the_serving_dtype(monkeypatch, tiny_base):
    import torch

    from model import loading

    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "cpu_native_bf16", lambda n=native: n)
        loaded = loading.load_base(str(tiny_base), "cpu", "auto")
        assert loaded.dtype == str(dtype).replace("torch.", "")
        assert next(loaded.model.parameters()).dtype == dtype
