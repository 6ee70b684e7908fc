"""Training data: reading `messages` / alpaca / HF datasets, identity templating, sampling.

Everything here is plain Python (no torch) so the bot and tests can use it
cheaply. A sample is a list of chat messages (`[{"role", "content"}, ...]`)
ending with an assistant turn. Bad rows stop loading with `DataError`
naming `file:line` and what is wrong, and nothing is half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterable, Optional, Sequence

ROLES = ("system", "user", "assistant")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
IDENTITY_FILE = "identity.jsonl"
IDENTITY_EVAL_FILE = "identity_eval.jsonl"
GENERAL_FILE = "general.jsonl"
GENERAL_EVAL_FILE = "general_eval.jsonl"

Messages = list[dict]


class DataError(ValueError):
    """A data file problem a user can fix; str() names the file (and line) and the fault."""


# --------------------------------------------------------------------------
# Row validation and conversion
# --------------------------------------------------------------------------


def validate_messages(messages, where: str) -> Messages:
    """Check one conversation; returns clean {role, content} dicts or raises DataError."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise DataError(f"{where}: messages[{i}] is a system message; only the first message may be one")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer, got {clean[-1]['role']!r}")
    if not clean[-1]["content"].strip():
        raise DataError(f"{where}: the assistant's answer is empty")
    return clean


def row_to_messages(row, where: str) -> Messages:
    """A `messages` row or an alpaca `instruction/input/output` row -> messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return validate_messages(row["messages"], where)
    if "instruction" in row or "output" in row:
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: alpaca row needs a string '{key}'")
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{where}: alpaca 'input' must be a string")
        prompt = row["instruction"] + ("\n" + inp if inp.strip() else "")
        msgs = []
        if isinstance(row.get("system"), str) and row["system"].strip():
            msgs.append({"role": "system", "content": row["system"]})
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        return validate_messages(msgs, where)
    raise DataError(
        f"{where}: unknown row format (keys: {', '.join(sorted(row)) or 'none'}); "
        "expected 'messages' or alpaca 'instruction'/'input'/'output'"
    )


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, parsed object) for each non-blank line; bad JSON names the line."""
    rows = []
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
    return rows


def read_json_array(path: Path) -> list[tuple[int, dict]]:
    """A JSON file holding an array of rows (alpaca style); line numbers are each row's start line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows")
    # Recover each element's line cheaply: decode again with raw_decode positions.
    decoder, out, pos = json.JSONDecoder(), [], text.index("[") + 1
    for item in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        line = text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)
        out.append((line, item))
    return out


def read_hf_dir(path: Path) -> list[tuple[int, dict]]:
    """A local Hugging Face `datasets` directory saved with save_to_disk (row index as 'line')."""
    try:
        import datasets  # noqa: F401  (optional dependency, imported only for this format)
    except ImportError:
        raise DataError(
            f"{path}: is a directory, read as a Hugging Face datasets dir, but the 'datasets' "
            "package is not installed (pip install datasets), or convert it to JSONL"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if hasattr(ds, "keys") and not hasattr(ds, "column_names") or isinstance(ds, dict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return [(i + 1, dict(r)) for i, r in enumerate(ds)]


def load_file(path: str | Path) -> list[Messages]:
    """Load every row of a dataset file or directory as messages (all-or-nothing)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: dataset not found")
    if p.is_dir():
        raw, label = read_hf_dir(p), f"{p} row"
    elif p.suffix == ".json":
        raw, label = read_json_array(p), str(p)
    else:
        raw, label = read_jsonl_rows(p), str(p)
    rows = [row_to_messages(row, f"{label}:{line}" if not p.is_dir() else f"{label} {line}") for line, row in raw]
    if not rows:
        raise DataError(f"{p}: no rows")
    return rows


def parse_spec(spec: str) -> tuple[str, Optional[int]]:
    """ms-swift's `path#N` -> (path, N); plain `path` -> (path, None)."""
    path, sep, count = spec.rpartition("#")
    if not sep:
        return spec, None
    if not count.isdigit() or int(count) <= 0:
        raise DataError(f"{spec}: '#N' must be a positive whole number of rows, got {count!r}")
    return path, int(count)


def sample_rows(rows: Sequence, n: Optional[int], seed: int) -> list:
    """ms-swift sampling: N <= len draws without replacement; N > len repeats the whole set
    (N // len times) and draws the remainder, so every row is oversampled evenly."""
    if n is None:
        return list(rows)
    rng = random.Random(seed)
    whole, rest = divmod(n, len(rows))
    out = list(rows) * whole
    out += rng.sample(list(rows), rest)
    rng.shuffle(out)
    return out


def load_spec(spec: str, seed: int, base_dir: Optional[Path] = None) -> list[Messages]:
    """Load `path` or `path#N` (relative paths against base_dir)."""
    path, n = parse_spec(spec)
    p = Path(path)
    if base_dir is not None and not p.is_absolute():
        p = base_dir / p
    return sample_rows(load_file(p), n, seed)


# --------------------------------------------------------------------------
# Identity templating and system prompts
# --------------------------------------------------------------------------


def fill_identity(messages: Messages, fill) -> Messages:
    """Fill {{NAME}}/{{AUTHOR}} in every message with `fill` (IdentityConfig.fill)."""
    return [{"role": m["role"], "content": fill(m["content"])} for m in messages]


def with_system(messages: Messages, system: Optional[str]) -> Messages:
    """Replace whatever system prompt there is with `system` (None: drop it, so the
    chat template injects its own default, as Qwen's does)."""
    body = [m for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": system}] if system is not None else []) + body


def both_system_variants(samples: Iterable[Messages], system: str) -> list[Messages]:
    """Each sample with the identity system prompt and with none, so the identity
    holds whether or not a client sends our system prompt."""
    out = []
    for s in samples:
        out.append(with_system(s, system))
        out.append(with_system(s, None))
    return out


def data_hash(samples: Sequence[Messages]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s, ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()[:16]


def last_user(messages: Messages) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return ""
