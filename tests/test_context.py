"""Prompt building: system first, newest turns within the token budget, mention stripped."""

from bot.context import Turn, build_prompt, estimate_tokens, message_tokens, strip_mention

SYSTEM = "You are Loopcord."


def conv(n):
    turns = []
    for i in range(n):
        turns.append(Turn("user", f"question {i} " + "word " * 20))
        turns.append(Turn("assistant", f"answer {i} " + "word " * 20))
    turns.append(Turn("user", "the new question"))
    return turns


def total_tokens(messages):
    return sum(message_tokens(m["content"]) for m in messages)


def test_system_prompt_first_and_question_last():
    msgs = build_prompt(SYSTEM, conv(3), token_budget=10_000, max_messages=50)
    assert msgs[0] == {"role": "system", "content": SYSTEM}
    assert msgs[-1] == {"role": "user", "content": "the new question"}
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * 3 + ["user"]


def test_budget_keeps_newest_turns_and_never_exceeds():
    for budget in range(60, 600, 17):
        msgs = build_prompt(SYSTEM, conv(10), token_budget=budget, max_messages=100)
        assert total_tokens(msgs) <= budget
        assert msgs[-1]["content"] == "the new question"
        assert msgs[1]["role"] == "user"  # history never opens with an orphan answer
        kept = [m["content"] for m in msgs[1:-1]]
        # The kept history is a contiguous newest suffix of the conversation.
        all_contents = [t.content for t in conv(10)[:-1]]
        assert kept == all_contents[len(all_contents) - len(kept):]


def test_max_messages_caps_history():
    msgs = build_prompt(SYSTEM, conv(10), token_budget=100_000, max_messages=5)
    assert len(msgs) - 1 <= 5


def test_oversized_question_is_shortened_not_dropped():
    msgs = build_prompt(SYSTEM, [Turn("user", "x" * 10_000)], token_budget=200, max_messages=10)
    assert len(msgs) == 2 and msgs[1]["content"].startswith("xxx") and msgs[1]["content"].endswith("…")
    assert total_tokens(msgs) <= 200


def test_cjk_counts_as_more_tokens_than_ascii():
    assert estimate_tokens("数据" * 100) > estimate_tokens("ab" * 100)


def test_strip_mention_removes_only_the_bot():
    assert strip_mention("<@123> hi <@!123> and <@456>", 123) == "hi  and <@456>"


def test_empty_turns_are_skipped():
    msgs = build_prompt(SYSTEM, [Turn("user", "a"), Turn("assistant", " "), Turn("user", "b")],
                        token_budget=1000, max_messages=10)
    assert [m["content"] for m in msgs[1:]] == ["a", "b"]


def test_long_question_is_trimmed_to_the_budget_with_a_notice():
    from bot.context import MSG_TRIMMED, fit_question

    short = fit_question("What is 2+2?", 100)
    assert short.text == "What is 2+2?" and short.notice is None
    long = fit_question("word " * 1000, 200)  # 5000 characters, as in issue 12
    assert estimate_tokens(long.text) <= 200 and long.text.startswith("word word")
    assert long.notice == MSG_TRIMMED.format(tokens=estimate_tokens("word " * 1000), budget=200)
    assert "max_tokens" not in long.notice


def test_budget_stays_inside_the_models_context_less_the_answer():
    from bot.context import context_budget, question_budget

    assert context_budget(3000, None, 512) == 3000  # unknown context: the configured budget
    assert context_budget(3000, 8192, 512) == 3000  # SmolLM2: the configured budget fits
    small = context_budget(3000, 2048, 512)
    assert small < 2048 - 512  # room for the answer, and for the estimate being low
    q = question_budget(SYSTEM, small)
    assert q + message_tokens(SYSTEM) < small
    msgs = build_prompt(SYSTEM, [Turn("user", "x" * 20_000)], token_budget=small, max_messages=10)
    assert sum(message_tokens(m["content"]) for m in msgs) <= small


def test_context_length_errors_reach_chat_users_without_api_advice():
    from bot.core import MSG_BAD_REQUEST, MSG_TOO_LONG, _error_notice
    from model.client import ModelBadRequest

    vllm_words = ("This model's maximum context length is 2048 tokens. However, you requested 2600 tokens "
                  "(2088 in the messages, 512 in the completion). Please reduce the length of the messages "
                  "or completion.")
    assert _error_notice(ModelBadRequest(vllm_words, 400), None) == MSG_TOO_LONG
    other = _error_notice(ModelBadRequest("'temperature' must be a finite number", 400), None)
    assert other == MSG_BAD_REQUEST and "temperature" not in other
    for notice in (MSG_TOO_LONG, MSG_BAD_REQUEST):
        assert "max_tokens" not in notice and "completion" not in notice
