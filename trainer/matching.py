"""Text matching used by the gate and by de-duplication (pure functions, zh + en).

- `normalize`: NFKC, case-folded, punctuation and whitespace removed, so
  "Paris." and " paris" compare equal and full-width Chinese punctuation does not matter.
- `answer_matches(answer, reference)`: the answer "says" the reference when the
  normalised reference is contained in the normalised answer, or when their
  token overlap F1 (words for Latin text, single characters for CJK) reaches
  MATCH_MIN_F1 and the answer keeps every fact token (what the reference says beyond the
  question and filler words) — a reworded but equivalent correction still counts, a
  near-copy with another day or number does not.
- `identity_ok(answer, name, author, forbidden)`: names our name or author and
  claims no other identity (no forbidden name that is not part of ours).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# Token-overlap F1 at which a reworded answer counts as matching the reference.
MATCH_MIN_F1 = 0.6
# Model names / makers an answer must never claim (case-insensitive substrings).
DEFAULT_FORBIDDEN_IDENTITIES = [
    "qwen", "通义", "千问", "alibaba", "阿里", "openai", "chatgpt", "gpt-4", "gpt-3", "gpt4",
    "claude", "anthropic", "gemini", "google", "llama", "meta ai", "文心", "百度", "deepseek",
    "grok", "xai", "mistral", "copilot", "microsoft", "bard", "ernie", "kimi", "moonshot", "doubao", "豆包",
    # The embedded default base (SmolLM2-135M-Instruct) believes it is SmolLM by Hugging Face.
    "smollm", "hugging face", "huggingface",
]



def forbidden_identities(cfg) -> list[str]:
    """The names the assistant must never claim: `eval.forbidden_identities`, else the default
    list (one rule for the gate, calibrate's refusals and the bot's review of corrections)."""
    return list(cfg.eval.forbidden_identities or DEFAULT_FORBIDDEN_IDENTITIES)


_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# CJK characters one by one; digits apart from letters ("8pm" -> "8", "pm").
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|\d+|[^\W\d_]+", re.UNICODE)


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def normalize(text: str) -> str:
    """Case-fold, NFKC, and keep only letters/digits (all punctuation and spaces dropped)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if ch.isalnum())


def tokens(text: str) -> list[str]:
    """Words for alphabetic scripts, one token per CJK character."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def overlap_f1(answer: str, reference: str) -> float:
    a, r = Counter(tokens(answer)), Counter(tokens(reference))
    common = sum((a & r).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


# Words that carry no fact of their own: a reworded answer may drop or swap them.
_FILLER = frozenset(
    "a an the is are was were be been at on in of to and or for by with from as this that these those it its "
    "our your my their his her we you i they there here every each 的 是 了 在 和 也 都 就".split())


def fact_tokens(reference: str, question: str = "") -> set[str]:
    """What the reference says that the question does not: its tokens less the question's and
    filler words ("every Thursday at 8 pm UTC" for "What day is the community meetup?")."""
    return set(tokens(reference)) - set(tokens(question)) - _FILLER


def answer_matches(answer: str, reference: str, min_f1: float = MATCH_MIN_F1, question: str = "") -> bool:
    """The normalised reference is in the answer; or the two overlap by `min_f1` and the answer
    keeps every fact token of the reference — "every Wednesday at 10 am UTC" shares most words
    with "every Thursday at 8 pm UTC" but is not it."""
    ref = normalize(reference)
    if ref and ref in normalize(answer):
        return True
    return overlap_f1(answer, reference) >= min_f1 and fact_tokens(reference, question) <= set(tokens(answer))


def question_key(question: str) -> str:
    """De-duplication key for a user question."""
    return normalize(question)


# Look-alike letters people (or models) use to slip a name past a check: Cyrillic and Greek
# letters that render as Latin ones, and characters that render as nothing.
_CONFUSABLES = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "х": "x", "у": "y", "і": "i", "ј": "j", "ѕ": "s",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "Х": "X", "α": "a", "ο": "o", "ρ": "p", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "τ": "t", "υ": "u",
})
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def _fold_identity(text: str) -> str:
    """NFKC, invisible characters dropped, look-alikes mapped to Latin, case-folded."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).translate(_CONFUSABLES).casefold()


def claimed_identities(text: str, name: str, author: str, forbidden=DEFAULT_FORBIDDEN_IDENTITIES) -> list[str]:
    """The forbidden names `text` mentions as words (case-insensitive, also spelled with look-alike
    letters, invisible characters or spaces between the letters: "C h a t G P T"), ignoring any
    inside our own name or author (a name containing "Meta" is not a slip). Empty: none named."""
    folded = _SPACED_LETTERS.sub("", _fold_identity(text))
    ours = [_fold_identity(s) for s in (name, author) if s.strip()]
    return [bad for bad in forbidden if _names(folded, bad.casefold()) and not any(bad.casefold() in s for s in ours)]


_SPACED_LETTERS = re.compile(r"(?<=\b\w)[\s.\-_·]+(?=\w\b)")  # "c h a t g p t" -> "chatgpt"


def _names(folded: str, name: str) -> bool:
    """`name` appears in `folded` as a word of its own ("bard" is not in "bombarded"); a CJK name
    anywhere (no spaces between words there)."""
    if is_chinese(name) or not name[:1].isalnum():
        return name in folded
    return re.search(rf"(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])", folded) is not None


# First-person self-description in the common languages: "I am X", "my name is X", "made by X",
# "Name: X", "Ich bin X", "Je suis X", "Soy X", "Sono X", "Eu sou X", "Я X", "私はX", "我是X", "本模型是X".
_SELF_CLAIM = re.compile(
    r"\b(i am|i'm|i’m|im|my name is|call me|this is|i was (created|made|developed|trained|built))\b"
    r"|\b(created|made|developed|trained|built|designed|powered)\s+by\b|\b(name|creator|model|developer)\s*:"
    r"|\b(ich bin|mein name ist|je suis|je m'appelle|soy|me llamo|sono|mi chiamo|eu sou|meu nome é|ik ben)\b"
    r"|(^|[^\w])я\b|меня зовут|создан|私は|僕は|わたしは|私の名前|저는|我是|我叫|我的名字|本模型|由.{0,20}(开发|训练|创建|打造|研发)",
    re.IGNORECASE,
)


def identity_claims(text: str, name: str, author: str, forbidden=DEFAULT_FORBIDDEN_IDENTITIES) -> list[str]:
    """Other identities `text` claims for the assistant: the forbidden names it mentions when it
    also speaks in the first person about who it is or who made it. "I am ChatGPT, made by
    OpenAI" -> ['openai', 'chatgpt']; "Google was founded in 1998" -> [] (a fact, not a claim)."""
    if not _SELF_CLAIM.search(_fold_identity(text)):
        return []
    return claimed_identities(text, name, author, forbidden)


def identity_ok(answer: str, name: str, author: str, forbidden=DEFAULT_FORBIDDEN_IDENTITIES) -> bool:
    """True when the answer names us (name or author) and no other model or maker."""
    ours = [s for s in (name, author) if s.strip()]
    if not any(normalize(s) and normalize(s) in normalize(answer) for s in ours):
        return False
    return not claimed_identities(answer, name, author, forbidden)


# ---------------------------------------------------------------- does an answer state a fact?
# Used by the gate ("learned") and by the bot (an answer's memory source). A person reading
# an answer asks: does it give the fact's key content — its names, numbers, times, days,
# channels — without denying it? Wording, extra true context and order do not matter.
# Measured on benchmarks/data/matcher_labels.jsonl (benchmarks/matcher_bench.py).

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_NUMBER_WORDS.update({w: str(n) for w, n in _TENS.items()})
_NUMBER_WORDS.update({f"{t}-{u}": str(n + int(_NUMBER_WORDS[u])) for t, n in _TENS.items()
                      for u in "one two three four five six seven eight nine".split()})
_NUMBER_WORDS.update({"hundred": "100", "thousand": "1000", "once": "1", "twice": "2"})
_NUMBER_WORD = re.compile(r"\b(" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_DAYS_MONTHS = frozenset(
    "monday tuesday wednesday thursday friday saturday sunday weekend daily weekly monthly yearly "
    "january february march april may june july august september october november december "
    "first second third fourth fifth last".split())
_PLURALS = {f"{d}s": d for d in "monday tuesday wednesday thursday friday saturday sunday weekend".split()}
_TIME_12H = re.compile(r"\b(\d{1,2})(?:[:.](\d{2}))?\s*(?:([ap])\.?\s?m\b\.?|(?:o'clock\s+)?in the (morning|afternoon|evening|night))",
                       re.IGNORECASE)
_TIME_24H = re.compile(r"\b(\d{1,2}):(\d{2})\b")
# "Sunday evening at six": the part of the day before the hour.
_TIME_DAYPART = re.compile(r"\b(morning|afternoon|evening|night)\s+at\s+(\d{1,2})(?:[:.](\d{2}))?(?![\d:.]|\s*[ap]\.?m\b)",
                           re.IGNORECASE)
_HUNDREDS = re.compile(r"\b(\d{1,2}) (100|1000)(?: and)?(?: (\d{1,2}))?\b")  # "8 100 50" (eight hundred fifty)
_EXAMPLE = re.compile(r"[,;(]?\s*\b(?:for example|for instance|e\.g\.|such as)\b[^.;)]*", re.IGNORECASE)
_MONTH_VERBS = frozenset({"may", "march"})  # months only when capitalised
_MONTHS = "january february march april may june july august september october november december".split()
_MONTH_ABBR = {m[:3]: m for m in _MONTHS} | {"sept": "september"}
_ORDINALS = {w: str(i) for i, w in enumerate("zeroth first second third fourth fifth sixth seventh eighth ninth "
                                             "tenth".split())}
_DAY_ABBR = {"mon": "monday", "tue": "tuesday", "tues": "tuesday", "wed": "wednesday", "thu": "thursday",
             "thur": "thursday", "thurs": "thursday", "fri": "friday", "sat": "saturday", "sun": "sunday"}
_PERIODS = {"daily": "day", "weekly": "week", "monthly": "month", "yearly": "year", "annually": "year"}
# A question that asks when or how much: its answer is the time or the number, not the names around it.
_ASKS_NUMBER = re.compile(r"^\W*(?:when\b|what (?:time|day|date|year|temperature)\b|which (?:day|date|year)\b|"
                          r"how (?:long|often|soon|many|much|old|tall|far|fast|big|heavy|high|deep|large)\b)",
                          re.IGNORECASE)
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_ORDINAL_SUFFIX = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b", re.IGNORECASE)
# Time zones spelled out or abbreviated ("9 am EST" = "9:00 Eastern").
_ZONES = {"est": "eastern", "edt": "eastern", "et": "eastern", "cet": "cet", "cest": "cet", "pst": "pacific",
          "pdt": "pacific", "pt": "pacific", "gmt": "utc", "bst": "bst", "jst": "jst", "ist": "ist"}
_ZONE_NAMES = re.compile(r"\b(?:central european(?: summer)? time|eastern(?: standard| daylight)?(?: time)?|"
                         r"pacific(?: standard| daylight)?(?: time)?)\b", re.IGNORECASE)
_INTERJECTION = re.compile(r"\b(?:no|nope|yes|yeah|yep)\s*[,.!;:\u2014-]+\s", re.IGNORECASE)  # "No, #general is ..."
_SENTENCE_START = re.compile(r"(?:^|[.?!:;]\s+|\n)\s*[\"'(“‘]*$")
_POSSESSIVE = re.compile(r"['’]s$")
_TIME_WORDS = {"noon": "t12:00", "midday": "t12:00", "midnight": "t00:00"}
_URL = re.compile(r"(?:https?://)?(?:www\.)?((?:[\w-]+\.)+[a-z]{2,}(?:/[\w./?=&%-]*[\w/])?)", re.IGNORECASE)
_HANDLE = re.compile(r"(?<![\w/])[#@/!]\w(?:[\w.@-]*\w)?", re.UNICODE)
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|t\d\d:\d\d|\d+(?:[.,]\d+)*|[^\W\d_]+(?:['’-][^\W\d_]+)*", re.UNICODE)
_NEGATION = frozenset("not no never isn't aren't wasn't weren't don't doesn't didn't cannot can't won't "
                      "neither nor 不 没 没有 不是".split())
# Capitalised at a sentence's start without being a name.
_COMMON_CAPS = _FILLER | frozenset(
    "yes no there here what when where who which how why please also only just all any some everyone "
    "members member you we they he she it if then so but however sure ok okay note see ask use check go "
    "post type run read contact join visit remember send talk write keep don't do".split())
NEGATION_WINDOW = 3  # a negation this many words before a key word denies it
MIN_CONTENT_RECALL = 0.6  # a fact with no key words: this share of its content words must appear
STEM = 5  # words sharing their first STEM letters count as one ("submissions", "submitting")


def _canonical(text: str) -> str:
    """NFKC without accents, number words as digits, times as 24-hour tokens ("6 pm", "6pm",
    "18:00", "six in the evening" -> "t18:00"), links without scheme; case kept."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = _ISO_DATE.sub(lambda m: f"{_MONTHS[int(m.group(2)) - 1].title()} {int(m.group(3))} {m.group(1)}"
                         if 1 <= int(m.group(2)) <= 12 else m.group(0), text)
    text = _ORDINAL_SUFFIX.sub(r"\1", text)
    text = _ZONE_NAMES.sub(lambda m: {"c": "CET", "e": "Eastern", "p": "Pacific"}[m.group(0)[0].lower()], text)
    text = _NUMBER_WORD.sub(lambda m: _NUMBER_WORDS[m.group(1).casefold()], text)
    text = _HUNDREDS.sub(lambda m: str(int(m.group(1)) * int(m.group(2)) + int(m.group(3) or 0)), text)

    def twelve(m: re.Match) -> str:
        pm = (m.group(3) or "").lower() == "p" or (m.group(4) or "").lower() in ("afternoon", "evening", "night")
        hour = int(m.group(1)) % 12 + (12 if pm else 0)
        return f" t{hour:02d}:{m.group(2) or '00'} "

    text = _TIME_12H.sub(twelve, text)
    text = _TIME_DAYPART.sub(lambda m: f"{m.group(1)} t{int(m.group(2)) % 12 + (0 if m.group(1).casefold() == 'morning' else 12):02d}"
                             f":{m.group(3) or '00'} ", text)
    text = _TIME_24H.sub(lambda m: f" t{int(m.group(1)):02d}:{m.group(2)} " if int(m.group(1)) < 24 else m.group(0),
                         text)
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 5,280 -> 5280


def _specials(canon: str) -> tuple[set[str], str]:
    """Links and handles (#channel, @name, /command) of canonical text, and the text without them."""
    found = {m.group(1).casefold().rstrip("/") for m in _URL.finditer(canon)}
    canon = _URL.sub(" ", canon)
    found |= {h.casefold() for h in _HANDLE.findall(canon)}
    return found, _HANDLE.sub(" ", canon)


def _words(text: str) -> list[str]:
    """Lower-cased words of canonical text; links and handles whole, and a handle's name alone
    too (an answer may say "the reading channel" for #reading)."""
    specials, rest = _specials(_canonical(text))
    out = sorted(specials) + [h[1:] for h in specials if h[:1] in "#@/!"]
    for w in _WORD.findall(rest):
        w = _fold(w)
        out.append(w)
        if "-" in w[1:]:  # "english-only" also says "english"
            out.extend(part for part in w.split("-") if part)
    return out


def key_words(text: str) -> set[str]:
    """A fact's key content: numbers and times, links and handles (#channel, @name, /command),
    days, months and ordinals, and names (capitalised words that are not sentence-initial
    function words; one that only starts a sentence counts when nothing else does)."""
    keys, weak = _key_words(text)
    return keys or weak


def _key_words(text: str) -> tuple[set[str], set[str]]:
    """Key words, and the capitalised words that only start a sentence ("Jupiter is ...",
    but also "Server boosters get ..."): names only when the fact has no other key."""
    keys, rest = _specials(_canonical(text))
    weak = set()
    later_caps = {m.group(0).casefold() for m in _WORD.finditer(rest)
                  if m.group(0)[0].isupper() and not _SENTENCE_START.search(rest[:m.start()])}
    for m in _WORD.finditer(rest):
        word = m.group(0)
        folded = _fold(word)
        if folded in _MONTH_VERBS and not word[0].isupper():
            continue
        if _numeric(folded):
            keys.add(folded)
        elif word[0].isupper() and folded not in _COMMON_CAPS and len(folded) > 1 and not _CJK.match(word):
            # A capital that only starts a sentence ("Server boosters get ...") is no name unless
            # the word is capitalised elsewhere too, or written like a name (NSFW, McDonald).
            if (_SENTENCE_START.search(rest[:m.start()]) and word.casefold() not in later_caps
                    and not any(c.isupper() for c in word[1:])):
                weak.add(folded)
                continue
            keys.add(folded)
    return keys, weak - keys


def _fold(word: str) -> str:
    """A word as keys compare it: case-folded, possessive dropped, "Dec" -> "december",
    "EST" -> "eastern", "Sundays" -> "sunday", "noon" -> "t12:00"."""
    w = _POSSESSIVE.sub("", word.casefold())
    w = _MONTH_ABBR.get(w.rstrip("."), w)
    if word[:1].isupper():
        w = _DAY_ABBR.get(w.rstrip("."), w)
    w = _ZONES.get(w, w)
    w = _ORDINALS.get(w) or _PERIODS.get(w, w)
    return _TIME_WORDS.get(w) or _PLURALS.get(w, w)


def _surnames(fact: str) -> dict[str, str]:
    """Each word of a name of several capitalised words ("Vincent van Gogh") mapped to the
    name's last word: a person who says "Van Gogh" has named him."""
    out = {}
    for run in re.findall(r"[A-Z][\w'’-]+(?:\s+(?:(?:van|von|de|da|del|der|di|du|la|le|bin|al)\s+)*[A-Z][\w'’-]+)+",
                          _canonical(fact)):
        words = [w.casefold() for w in run.split()]
        out.update({w: words[-1] for w in words[:-1]})
    return out


def _stem(word: str) -> str:
    return word[:STEM] if len(word) > STEM and word.isalpha() else word


def _numeric(key: str) -> bool:
    """A number, a time ("t18:00"), a day, month or ordinal."""
    return key[0].isdigit() or (key[0] == "t" and key[1:2].isdigit()) or key in _DAYS_MONTHS


def _parts(name: str) -> list[str]:
    return [p for p in re.split(r"[-_.]", name) if p]


def _rounds_to(key: str, present: set[str]) -> bool:
    """A decimal in the answer is `key` rounded ("1.61" for 1.609; whole numbers must be exact)."""
    if "." not in key:
        return False
    decimals = len(key.split(".")[1])
    return any(re.fullmatch(r"\d+\.\d+", w) and len(w.split(".")[1]) < decimals
               and round(float(key), len(w.split(".")[1])) == float(w) for w in present)


def _has(present: set[str], words: list[str], key: str) -> bool:
    """The answer (its `words`, and their set `present`) gives `key`: the same word, its singular or
    plural ("DM" for "DMs"), a channel or person by its name ("reading" for #reading, "art showcase"
    for #art-showcase; a command only as itself: "open a ticket" does not say /ticket), a hyphenated
    key by its parts in order ("English only"), or a number rounded ("1.61" for 1.609)."""
    if key in present or (key.endswith("s") and key[:-1] in present) or f"{key}s" in present:
        return True
    if key[:1] in "/!":
        return False
    name = key[1:] if key[:1] in "#@" else key
    parts = _parts(name)
    if name in present or (len(parts) > 1 and any(words[i:i + len(parts)] == parts for i in range(len(words)))):
        return True
    return key[:1].isdigit() and _rounds_to(key, present)


def _negated(words: list[str], key: str) -> bool:
    """Every mention of `key` has a negation within NEGATION_WINDOW words before it."""
    spots = [i for i, w in enumerate(words) if w == key]
    return bool(spots) and all(any(w in _NEGATION for w in words[max(0, i - NEGATION_WINDOW):i]) for i in spots)


def states_fact(answer: str, fact: str, question: str = "") -> bool:
    """Whether `answer` states `fact` (the approved answer to `question`), in any words.

    The fact's key words that the question does not already give must all appear in the
    answer, none of them denied ("not Jupiter") where the fact does not deny it; a fact
    without key words needs most of its content words instead, undenied. (A meaning check by
    the memory's embedding model beside it changed no verdict on the labelled answers:
    benchmarks/matcher_bench.py.)"""
    if is_chinese(fact):  # no word boundaries to read keys from: the characters' overlap decides
        return answer_matches(answer, fact, question=question)
    fact = _EXAMPLE.sub("", fact)  # "for example /remindme 2h stretch" illustrates; it is not the fact
    # "No, #general is English-only" answers a yes/no question; the "No" denies nothing after it.
    answer, fact = _INTERJECTION.sub(" ", answer), _INTERJECTION.sub(" ", fact)
    answer_words, fact_words = _words(answer), _words(fact)
    present = set(answer_words)
    asked = {_stem(w) for w in _words(question)}
    strong, weak = _key_words(fact)
    keys = {k for k in strong if _stem(k) not in asked} or {k for k in weak if _stem(k) not in asked}
    if _ASKS_NUMBER.search(question) and any(_numeric(k) for k in keys):
        keys = {k for k in keys if _numeric(k) or k[:1] in "#@/!" or "." in k}  # "1945." answers "When did WWII end?"
    surnames = _surnames(fact)
    keys = {k for k in keys if surnames.get(k) not in present}  # "Van Gogh" names Vincent van Gogh
    if not keys:
        keys = {w for w in fact_words if _stem(w) not in asked} - _FILLER - _NEGATION
        if not keys:
            return normalize(fact) in normalize(answer)
        stems = {_stem(w) for w in present}
        if sum(1 for k in keys if _stem(k) in stems) / len(keys) < MIN_CONTENT_RECALL:
            return False
        keys = {k for k in keys if k in present}
    elif not all(_has(present, answer_words, k) for k in keys):
        return False
    elif any(k[:1] == "#" and k not in present for k in keys) and any(
            w[:1] == "#" and w not in fact_words for w in present):
        return False  # "the game night channel" is not #game-night when the answer names #lounge
    return not any(_negated(answer_words, k) and not _negated(fact_words, k) for k in keys)


# ---------------------------------------------------------------- is a question about a stored fact?
# Sentence embeddings put "Name the capital city of Portugal." close to a fact about "What is the
# capital of Brazil?" (0.57) and "What's our Mastodon handle?" farther from its own fact (0.42). A
# person sees the difference in the names and numbers: the question names something the fact does
# not, and the fact's question names something this one does not. On the development facts this
# check let the memory's threshold drop from 0.45 to 0.40: 90% of unseen rewordings found their
# fact (86% before) while general questions given a fact fell from 16% to 7% (benchmarks/memory_bench.py).

def subject_keys(text: str) -> set[str]:
    """What a question names: its key words without the capitals that only start a sentence
    ("Which city is Brazil's capital?" -> {"brazil"})."""
    return _key_words(text)[0]


def _mentions(text: str):
    """A test: does `text` mention a key? The same word, its stem ("brazilian" for "brazil"), a
    handle's name alone ("general" for #general), or an acronym of its capitalised words ("US")."""
    words = set(_words(text))  # folded as the keys are
    stems = {_stem(w) for w in words}
    initials = "".join(w[0] for w in re.findall(r"\b[A-Z][a-z]+", text)).casefold()
    return lambda key: (key in words or _stem(key) in stems or (key[:1] in "#@/!" and key[1:] in words)
                        or (key.isalpha() and len(key) > 1 and key in initials))


def other_subject(question: str, fact_question: str, fact_answer: str) -> bool:
    """`question` asks about something else than the stored fact: it names something the fact
    (its question and answer) does not mention, and the fact's question names something
    `question` does not ("capital of Portugal" against "capital of Brazil"; "13 plus 4" against
    "12 times 13"). A reworded question that names nothing new is never another subject."""
    in_fact, in_question = _mentions(f"{fact_question}\n{fact_answer}"), _mentions(question)
    return (any(not in_fact(k) for k in subject_keys(question))
            and any(not in_question(k) for k in subject_keys(fact_question)))
