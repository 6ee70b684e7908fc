"""The gate's decision on scores (pure logic): every check can fail, none passes by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.config import config_from_dict
from trainer.gate import decide, retention
from trainer.matching import identity_claims

ROOT = Path(__file__).resolve().parent.parent


def scores(identity=1.0, loss=1.0, right=(True, True, True, True), learned=(True,), claims=((),)) -> dict:
    items = [{"id": i, "learned": ok, "claims_identity": list(c)} for i, (ok, c) in enumerate(zip(learned, claims))]
    return {
        "identity": {"accuracy": identity},
        "general": {"loss": loss, "right": list(right)},
        "corrections": {"items": items, "learned": sum(learned) / len(learned) if learned else None},
    }


def failed(cand, ref, **eval_cfg) -> set[str]:
    cfg = config_from_dict({"eval": eval_cfg})
    passed, checks = decide(cfg, cand, ref)
    assert passed == (not [c for c in checks if not c["passed"]])
    return {c["name"] for c in checks if not c["passed"]}


def test_a_good_candidate_passes_every_check():
    assert failed(scores(), scores()) == set()


def test_forgetting_general_answers_fails_on_retention_not_on_a_negative_limit():
    # The reference answers 4 right (gated from 4 on here); the candidate keeps 1: retention 0.25 < 0.8 (the
    # default); 3 of 4 (0.75) fails it too.
    assert failed(scores(right=(True, False, False, False)), scores(), min_retention_questions=4) == {"general_retention"}
    assert failed(scores(right=(True, True, True, False)), scores(), min_retention_questions=4) == {"general_retention"}
    assert failed(scores(right=(True, True, True, False)), scores(), min_general_retention=0.9,
                  min_retention_questions=4) == {"general_retention"}
    assert retention([True, False, True], [True, True, False]) == 0.5
    assert retention([True], [False]) is None  # nothing to retain: no check, not a free pass of a fake one


def test_a_run_that_learned_some_corrections_and_lost_nothing_passes_one_that_learned_none_fails():
    # By default a person's judgement: the candidate knows more than its parent and nothing less.
    assert failed(scores(learned=(True, False, False), claims=((), (), ())), scores()) == set()
    assert failed(scores(learned=(False, False), claims=((), ())), scores()) == {"corrections_learned"}
    # ... and it still has to lose nothing else.
    assert failed(scores(learned=(True, False), claims=((), ()), identity=0.5), scores()) == {"identity_accuracy"}


def test_an_admin_can_ask_for_a_share_of_the_corrections_learned():
    assert failed(scores(learned=(True, False), claims=((), ())), scores(),
                  min_corrections_learned=0.8) == {"corrections_learned"}
    assert failed(scores(learned=(True, True, True, True, False), claims=((),) * 5), scores(),
                  min_corrections_learned=0.8) == set()


def test_a_correction_that_claims_another_identity_fails_the_gate_even_when_learned():
    text = "I am ChatGPT, made by OpenAI."
    claims = identity_claims(text, "Loopcord", "the Loopcord community")
    assert claims
    assert "corrections_claiming_other_identity" in failed(scores(claims=(claims,)), scores())


def test_identity_and_loss_checks():
    assert failed(scores(identity=0.5), scores()) == {"identity_accuracy"}
    assert failed(scores(loss=1.3), scores(loss=1.0)) == {"general_loss"}


def test_retention_is_gated_only_on_enough_questions_the_reference_answers_right():
    """A reference that knows 2 questions (the tests' tiny model) gives a share of 0, 0.5 or 1 by
    which of the 2 a candidate keeps: noise, not gated. From eval.min_retention_questions (10 by
    default) the share decides; the general loss is checked either way."""
    few = scores(right=(True, True) + (False,) * 10)
    assert failed(scores(right=(False,) * 12), few) == set()
    assert failed(scores(right=(False,) * 12, loss=2.0), few) == {"general_loss"}
    ten = scores(right=(True,) * 10 + (False,) * 2)
    assert failed(scores(right=(True,) * 7 + (False,) * 5), ten) == {"general_retention"}  # kept 7 of 10
    assert failed(scores(right=(True,) * 8 + (False,) * 4), ten) == set()  # 8 of 10: the 0.8 default
    assert failed(scores(right=(False,) * 12), few, min_retention_questions=2) == {"general_retention"}


@pytest.mark.parametrize("text", [
    "Ich bin ChatGPT von OpenAI.", "Je suis ChatGPT, créé par OpenAI.", "私はChatGPTです", "Я ChatGPT от OpenAI",
    "I am Ch\u0430tGPT",  # a Cyrillic а
    "I am C\u200bhatGPT", "I am C h a t G P T", "Name: ChatGPT. Creator: OpenAI.", "I am Grok from xAI",
    "本模型是通义千问", "Soy Gemini, de Google.",
])
def test_identity_claims_in_other_languages_and_disguises_are_caught(text):
    assert identity_claims(text, "Loopcord", "the Loopcord community")


@pytest.mark.parametrize("text", [
    "I am Loopcord, made by the Loopcord community.", "Google was founded in 1998.",
    "I'm bombarded with questions by Bernie.", "The book club meets every Sunday at 6 pm UTC in #reading.",
])
def test_facts_and_our_own_identity_are_not_claims(text):
    assert identity_claims(text, "Loopcord", "the Loopcord community") == []


@pytest.mark.parametrize("question, fact, answer, right", [
    # The two answers the token-F1 gate scored as "not learned" (issue 28).
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.",
     "The largest planet in our solar system is Jupiter, which is approximately 11 times the diameter of Earth.", True),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.", "An hour is equal to 60 minutes.", True),
    # Other formats of the same key content.
    ("When is book club?", "The book club meets every Sunday at 6 pm UTC in #reading.",
     "Sundays, 18:00 UTC, in the reading channel.", True),
    ("How many continents are there?", "There are 7 continents.", "Seven.", True),
    # The half-learned answer the candidate gave, a denial, and a partial answer.
    ("When is book club?", "The book club meets every Sunday at 6 pm UTC in #reading.",
     "Every Sunday at 10 am UTC in #bookclub.", False),
    ("What is the largest planet?", "Jupiter is the largest planet.", "It is not Jupiter, it is Saturn.", False),
    ("When is book club?", "The book club meets every Sunday at 6 pm UTC in #reading.", "On Sundays.", False),
    # What people write: a surname, the year alone, abbreviated dates and days, number words,
    # a channel by its words, a "No," that answers the question, an example left out.
    ("Who painted The Starry Night?", "The Starry Night was painted by Vincent van Gogh.", "Van Gogh.", True),
    ("When did WWII end?", "World War II ended in 1945.", "1945.", True),
    ("When do Secret Santa sign-ups close?", "Secret Santa sign-ups close on December 1st.", "Sign-ups end Dec 1.", True),
    ("When are the study sessions?", "Study sessions are Mondays and Wednesdays at 7 pm CET in #study-hall.",
     "Every Mon + Wed at 19:00 Central European Time in the study hall channel.", True),
    ("How many members does the server have?", "The server has about 850 members.",
     "About eight hundred fifty people are in the server.", True),
    ("Who is allowed to use @everyone?", "Only admins may use @everyone.", "Only admins can ping @everyone.", True),
    ("Can I speak Spanish in #general?", "#general is English only; use #international for other languages.",
     "No, #general is English-only; for Spanish, use #international.", True),
    ("How do I set a reminder?", "Use /remindme, for example /remindme 2h stretch.", "Type /remindme with a time.", True),
    # ... and what they do not accept: another channel named beside the event's words, a rounded
    # whole number, another command.
    ("When is game night?", "Game night is every Friday at 8 pm EST in #game-night.",
     "Game night is every Friday at 8 pm EST in the #lounge channel.", False),
    ("How many feet are in a mile?", "There are 5280 feet in a mile.", "There are 5,000 feet in a mile.", False),
    # A channel's words scattered through an answer do not name it, and a command is named only as itself.
    ("Where do I ask for help with my code?", "Ask coding questions in #code-help and include your error message.",
     "You can ask for help with your code on the Loopcord community.", False),
    ("How do I open a ticket?", "Type /ticket in #help-desk to open a support ticket.",
     "Type /help-desk to open a help ticket.", False),
])
def test_the_gate_judges_whether_an_answer_states_the_fact_as_a_person_would(question, fact, answer, right):
    from trainer.matching import states_fact

    assert states_fact(answer, fact, question) is right


@pytest.mark.parametrize("question, fact_question, fact, other", [
    # Another slot of the same template: a close embedding, another subject.
    ("Name the capital city of Portugal.", "What is the capital of Brazil?", "Brasília is the capital of Brazil.", True),
    ("What is 13 plus 4?", "What is 12 times 13?", "12 times 13 is 156.", True),
    ("When is the Munich meetup?", "When is the Berlin meetup?", "The Berlin meetup is on the first Saturday.", True),
    ("Is the Friday stream cancelled?", "When is the Sunday stream?", "The Sunday stream starts at 8 pm UTC.", True),
    # Rewordings that name the same things another way, or nothing at all.
    ("Is Rio the Brazilian capital?", "What is the capital of Brazil?", "Brasília is the capital of Brazil.", False),
    ("Which city is Brazil's capital?", "What is the capital of Brazil?", "Brasília is the capital of Brazil.", False),
    ("Who was the first US president?", "Who was the first president of the United States?",
     "George Washington was the first president of the United States.", False),
    ("What does a third warning get you?", "What happens after three warnings?", "Three warnings mean a ban.", False),
    ("What's the slowmode in general chat?", "How long is the slow mode in #general?", "Slow mode in #general is 30 s.",
     False),
    ("My company is hiring, where can I share that?", "Where should I post job offers?", "Job posts go in #jobs-board.",
     False),
])
def test_the_memory_tells_a_question_about_another_subject_from_a_rewording(question, fact_question, fact, other):
    from trainer.matching import other_subject

    assert other_subject(question, fact_question, fact) is other


@pytest.mark.parametrize("split", ["dev", "test"])
def test_a_stored_fact_is_never_another_subject_for_its_own_question(split):
    # Asked again word for word, a taught question must find its own fact.
    from trainer.matching import other_subject

    facts = [json.loads(line) for line in (ROOT / "benchmarks" / "data" / f"facts_{split}.jsonl").read_text().splitlines()
             if line.strip()]
    assert [f["question"] for f in facts if other_subject(f["question"], f["question"], f["correction"])] == []
