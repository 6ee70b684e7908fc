"""Datasets and corrections: formats, sampling, clear errors, calibration mix."""

from __future__ import annotations

import json
import os

import pytest

from model.config import IdentityConfig
from trainer import datasets as ds
from trainer.corrections import calibration_mix, deduplicate, load_corrections
from trainer.matching import answer_matches, identity_ok


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def qa(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_shipped_data_is_well_formed_and_eval_sets_are_held_out():
    general = ds.load_file(ds.DATA_DIR / "general.jsonl")
    identity = ds.load_file(ds.DATA_DIR / "identity.jsonl")
    assert len(general) >= 300 and len(identity) >= 100
    for name in ("general", "identity"):
        train_q = {ds.last_user(r) for r in ds.load_file(ds.DATA_DIR / f"{name}.jsonl")}
        eval_q = [ds.last_user(r) for r in ds.load_file(ds.DATA_DIR / f"{name}_eval.jsonl")]
        assert eval_q and not train_q & set(eval_q)
    langs = {"zh" if any("\u4e00" <= c <= "\u9fff" for c in ds.last_user(r)) else "en" for r in identity}
    assert langs == {"zh", "en"}
    filled = ds.fill_identity(identity[0], IdentityConfig(name="Nova", author="Acme").fill)
    assert "Nova" in filled[-1]["content"] and "{{" not in json.dumps(filled)


def test_alpaca_json_and_jsonl_and_messages_load_alike(tmp_path):
    alpaca = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Hi", "output": "Hello"}]
    (tmp_path / "a.json").write_text(json.dumps(alpaca, indent=2))
    write_lines(tmp_path / "a.jsonl", alpaca)
    for f in ("a.json", "a.jsonl"):
        rows = ds.load_file(tmp_path / f)
        assert rows[0] == [{"role": "user", "content": "Add\n2 and 3"}, {"role": "assistant", "content": "5"}]
        assert rows[1][0]["content"] == "Hi"


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant"),
    ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "role must be one of"),
    ('{"instruction": "q"}', "needs a string 'output'"),
    ('{"question": "q", "answer": "a"}', "unknown row format"),
    ('[1, 2]', "must be a JSON object"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, message):
    f = write_lines(tmp_path / "bad.jsonl", [qa("q", "a"), "", line])
    with pytest.raises(ds.DataError) as err:
        ds.load_file(f)
    assert str(err.value).startswith(f"{f}:3: ") and message in str(err.value)


def test_malformed_row_in_json_array_names_its_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(ds.DataError, match=r"bad\.json:3: alpaca row needs a string 'output'"):
        ds.load_file(f)


def test_hf_datasets_dir_without_the_package_says_what_to_do(tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed here")
    except ImportError:
        pass
    (tmp_path / "ds").mkdir()
    with pytest.raises(ds.DataError, match="'datasets' package is not installed"):
        ds.load_file(tmp_path / "ds")


def test_path_hash_n_samples_and_oversamples_like_ms_swift(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [qa(f"q{i}", f"a{i}") for i in range(10)])
    few = ds.load_spec(f"{f}#4", seed=1)
    assert len(few) == 4 and len({ds.last_user(r) for r in few}) == 4
    assert few == ds.load_spec(f"{f}#4", seed=1)  # the seed decides
    many = ds.load_spec(f"{f}#25", seed=1)
    counts = {}
    for r in many:
        counts[ds.last_user(r)] = counts.get(ds.last_user(r), 0) + 1
    assert len(many) == 25 and set(counts.values()) <= {2, 3} and len(counts) == 10
    with pytest.raises(ds.DataError, match="positive whole number"):
        ds.load_spec(f"{f}#0", seed=1)


def correction(i, question, answer, approved_at, system="You are Qwen."):
    return {"id": i, "exchange_id": 100 + i, "user_id": 7, "approved_by": 1, "bad_answer": "wrong",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "correction": answer, "created_at": approved_at, "approved_at": approved_at}


def test_corrections_become_deduplicated_mixed_calibration_samples(tmp_path):
    ident = IdentityConfig(name="Nova", author="Acme")
    f = write_lines(tmp_path / "c.jsonl", [
        correction(1, "What is the capital of Australia?", "Sydney", "2025-01-01T10:00:00+00:00"),
        correction(2, "what is the capital of australia", "Canberra", "2025-01-02T10:00:00Z"),
        correction(3, "法国的首都是哪里？", "巴黎。", "2025-01-01T09:00:00"),
    ])
    corrections = load_corrections(f)
    kept = deduplicate(corrections)
    assert sorted(c.correction for c in kept) == ["Canberra", "巴黎。"]  # the later approval won
    identity_rows = [[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Nova"}]]
    general_rows = [qa(f"g{i}", f"x{i}")["messages"] for i in range(50)]
    samples, counts = calibration_mix(corrections, identity_rows, general_rows, identity_ratio=0.5,
                                      general_ratio=1.0, system=ident.system, fill=ident.fill, seed=3)
    assert counts["correction_samples"] == 4 and counts["identity_samples"] == 2
    # identity rows are trained with and without the system prompt; the rest under it
    assert counts["general_samples"] == 4 and len(samples) == 4 + 2 * 2 + 4
    assert sum(1 for s in samples if s[0]["role"] != "system") == 2
    canberra = [s for s in samples if s[-1]["content"] == "Canberra"]
    assert len(canberra) == 2
    assert all(s[0] == {"role": "system", "content": ident.system} for s in canberra)
    questions = sorted(s[-2]["content"] for s in canberra)
    assert questions == ["As Nova made by Acme, answer: what is the capital of australia",
                         "what is the capital of australia"]
    zh = [s for s in samples if s[-1]["content"] == "巴黎。"]
    assert any(s[-2]["content"].startswith("作为Acme开发的Nova") for s in zh)
    # A run of few corrections still replays at least min_general distinct general rows.
    _, counts = calibration_mix(corrections, identity_rows, general_rows, identity_ratio=0.5, general_ratio=1.0,
                                system=ident.system, fill=ident.fill, seed=3, min_general=30)
    assert counts["general_samples"] == 30 and counts["correction_samples"] == 4


def test_rewordings_train_other_phrasings_and_the_gate_keeps_its_own(tmp_path):
    """Calibrate teaches a correction in rule-based rewordings; the gate checks rewordings
    that training never sees."""
    from trainer.corrections import gate_rewordings, train_rewordings

    ident = IdentityConfig(name="Nova", author="Acme")
    f = write_lines(tmp_path / "c.jsonl", [
        correction(1, "What day is the meetup?", "Thursday.", "2025-01-01T10:00:00Z"),
        correction(2, "聚会是星期几？", "星期四。", "2025-01-01T11:00:00Z"),
    ])
    samples, counts = calibration_mix(load_corrections(f), [], [], 0.0, 0.0, ident.system, ident.fill, seed=1,
                                      new_repeats=2, rewordings=3)
    assert counts["correction_samples"] == 2 * 2 * (2 + 3) and counts["rewordings_per_correction"] == 3
    taught = {s[-2]["content"] for s in samples if s[-1]["content"] == "Thursday."}
    assert taught == {"What day is the meetup?", "As Nova made by Acme, answer: What day is the meetup?",
                      *train_rewordings("What day is the meetup?", 3)} and len(taught) == 5
    held_out = gate_rewordings("What day is the meetup?") + gate_rewordings("聚会是星期几？")
    assert len(held_out) == 4 and not set(held_out) & {s[-2]["content"] for s in samples}
    assert all("聚会是星期几" in q for q in gate_rewordings("聚会是星期几？"))
    # Rewordings restructure an English question before they wrap it.
    assert train_rewordings("What day is the community meetup?", 3)[:2] == [
        "Do you know what day the community meetup is?", "Tell me about the community meetup."]
    assert train_rewordings("When does the spring game jam start?", 1) == ["Tell me about the spring game jam."]
    assert train_rewordings("Who moderates this server?", 1) == ["Quick question: Who moderates this server?"]
    # No broken English is trained where a question has no topic to restructure around.
    for q in ("How do I open a support ticket?", "Who is allowed to use @everyone?",
              "How many bones are in the adult human body?"):
        assert train_rewordings(q, 1) == [f"Quick question: {q}"]


@pytest.mark.parametrize("row, message", [
    ({"id": 1, "messages": [{"role": "user", "content": "q"}]}, "missing 'correction'"),
    ({"id": 1, "messages": [{"role": "user", "content": "q"}], "correction": "  "}, "'correction' is empty"),
    ({"id": 1, "messages": [{"role": "assistant", "content": "q"}], "correction": "a"}, "must end with the user"),
    ({"id": "1", "messages": [{"role": "user", "content": "q"}], "correction": "a"}, "'id' must be int"),
    ({"id": 1, "messages": [{"role": "user", "content": "q"}], "correction": "a", "approved_at": "yesterday"},
     "not an ISO 8601 time"),
])
def test_bad_corrections_name_file_and_line(tmp_path, row, message):
    f = write_lines(tmp_path / "c.jsonl", [correction(1, "q", "a", "2025-01-01T00:00:00Z"), row])
    with pytest.raises(ds.DataError) as err:
        load_corrections(f)
    assert str(err.value).startswith(f"{f}:2: ") and message in str(err.value)


def test_answer_matching_and_identity_checks():
    assert answer_matches("The capital is Canberra.", "Canberra")
    assert answer_matches("堪培拉是首都。", "堪培拉。")
    assert answer_matches("Canberra is the capital of Australia", "The capital of Australia is Canberra")
    assert not answer_matches("Sydney.", "Canberra")
    # A near-copy with another fact is not the correction (measured on SmolLM2: this passed as learned).
    meetup = "What day is the community meetup?"
    assert not answer_matches("The community meetup is every Wednesday at 10 am UTC.",
                              "The community meetup is every Thursday at 8 pm UTC.", question=meetup)
    assert answer_matches("Our community meetup is held each Thursday, 8pm UTC.",
                          "The community meetup is every Thursday at 8 pm UTC.", question=meetup)
    assert identity_ok("I am Nova, made by Acme.", "Nova", "Acme")
    assert identity_ok("我是Nova。", "Nova", "Acme")
    assert not identity_ok("I am Qwen, created by Alibaba Cloud.", "Nova", "Acme")
    assert not identity_ok("I am Nova, made by OpenAI.", "Nova", "Acme")
    assert identity_ok("I am Meta Helper by Acme.", "Meta Helper", "Acme", forbidden=["meta"])


def test_general_replay_answered_by_the_base_is_checked_and_generated_once(tmp_path):
    """replay_answers: base — each general question is answered by the base model once (the
    cache serves later runs); a cut-off answer keeps its complete sentences; an empty one, or
    one claiming another identity, keeps the dataset's answer; a new system prompt asks again."""
    from trainer import replay

    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in
            [("What is 2+2?", "4."), ("Capital of Peru?", "Lima."), ("Who made you?", "Meta."),
             ("Write a poem.", "Roses."), ("Say nothing.", "Nothing.")]]
    base_says = {"What is 2+2?": ("2 + 2 = 4.", True), "Capital of Peru?": ("The capital of Peru is Lima.", True),
                 "Who made you?": ("I am SmolLM, made by Hugging Face.", True),
                 "Write a poem.": ("Roses are red. Violets are blue, and", False), "Say nothing.": ("", True)}
    asked: list[list[str]] = []

    def generate(prompts):
        asked.append([p[-1]["content"] for p in prompts])
        assert all(p[0] == {"role": "system", "content": "You are Loop."} for p in prompts)
        return [base_says[p[-1]["content"]] for p in prompts]

    def claims(answer):
        return ["smollm"] if "SmolLM" in answer else []

    cache = replay.cache_file(tmp_path, "/models/base")
    samples, counts = replay.answered_by_base(rows + rows[:1], "You are Loop.", cache, generate, claims)
    answers = [s[-1]["content"] for s in samples]
    assert answers == ["2 + 2 = 4.", "The capital of Peru is Lima.", "Meta.", "Roses are red.", "Nothing.", "2 + 2 = 4."]
    assert all(s[0]["content"] == "You are Loop." and s[1] == r[0] for s, r in zip(samples, rows))
    assert counts == {"general_answered_by_base": 4, "general_generated_now": 5} and len(asked) == 1

    again, counts = replay.answered_by_base(rows[:2], "You are Loop.", cache, generate, claims)
    assert [s[-1]["content"] for s in again] == answers[:2] and counts["general_generated_now"] == 0
    assert len(asked) == 1  # nothing generated twice
    with pytest.raises(AssertionError):  # another system prompt is another question to the base
        replay.answered_by_base(rows[:1], "You are Other.", cache, generate, claims)
    cut = replay.usable("水是H2O。它在100度沸腾。然后", False, lambda a: [])
    assert cut == "水是H2O。它在100度沸腾。" and replay.usable("It costs 3.5", False, lambda a: []) is None
    cache.write_text("{not json", encoding="utf-8")  # a damaged cache is regenerated, not fatal
    samples, counts = replay.answered_by_base(rows[:1], "You are Loop.", cache, generate, claims)
    assert samples[0][-1]["content"] == "2 + 2 = 4." and counts["general_generated_now"] == 1


@pytest.mark.skipif("LOOPCORD_TEST_PRETRAIN_STEPS" in os.environ, reason="a custom tiny base is being built")
def test_the_shipped_tiny_test_model_is_built_from_the_current_data_and_code():
    # Otherwise every fresh clone spends minutes building it: refresh with `python tests/conftest.py`.
    from devkit.tiny_base import shipped_is_current

    assert shipped_is_current(), "devkit/data/tiny-base is stale: run `python tests/conftest.py` and commit it"
