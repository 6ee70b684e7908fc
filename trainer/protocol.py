"""The trainer's public contract with whoever runs it (the bot, a script, CI).

`python -m trainer COMMAND --progress json` prints one JSON object per line on
stdout and nothing else, each one of the event types below (the trainer writes them
through these classes, trainer.progress; the bot reads them through `parse_event` and
`Outcome.done_as`). Every run ends with exactly one final event:

    {"event": "done", "command": ..., ...}      the command did its job (DoneEvent)
    {"event": "error", "message": ..., "exit_code": N}   it did not (ErrorEvent)

and exits with an `ExitCode`. Before the first training step there is always a
`phase` event (PhaseEvent: phase, message), so a slow start never looks like a hang;
training steps are `progress` events (ProgressEvent: stage, step, total, loss,
tokens_per_s, eta_s; step 0 as soon as the plan is known). What each command's `done`
event carries besides "command" (DONE_EVENTS; the bot needs nothing else):

    anchor/generalize/calibrate  TrainDone: version, path, stage, parent, samples, train
    eval        EvalDone: version, path, verdict ("passed"/"failed"), passed, reference,
                metrics, checks, report (path of eval.json), chart (path of eval.png or
                null), corrections ([{"id", "learned", "question", "correction",
                "answer"}]: each correction checked, with the candidate's answer), and
                learned / not_learned (their ids)
    promote     PointerDone: version (live now), path, previous (what PROMOTED said)
    rollback    PointerDone: version (live now), path, previous (rolled away from)
    import      ImportDone: version, path, source
    list        ListDone: versions (one row per version, Registry.describe)
    check       CheckDone: repaired (what it repaired, in words; [] nothing)
    bootstrap   BootstrapDone: version, path, stage ("bootstrap"), promoted (true), and,
                when this run trained it, every field of the eval event too

A failed gate is a `done` event with verdict "failed" and exit code 3. A calibrate that will
not train some corrections (too long, claiming another identity) ends, before loading any
model, in an error event (exit code 2) that also carries "refused_corrections": [{"id",
"correction", "reason"}, ...] (`RefusedCorrection`), so the caller can name them to whoever
can reject or edit them. `calibrate --corrections FILE` reads one `CorrectionRecord` per
line, the bot's export. Statuses that cross over: `Verdict`, `VersionStatus` (a version's
manifest).
This module imports nothing heavy: the bot imports it (and trainer.registry's
read API), never the trainer's internals.
"""

from __future__ import annotations

import datetime as dt
import signal
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import IntEnum, StrEnum
from typing import Any, Callable, ClassVar, Optional, TypeVar

# What counts as the assistant claiming another identity: one definition for the gate and for
# the bot's review of corrections (pure functions, standard library only).
from trainer.matching import DEFAULT_FORBIDDEN_IDENTITIES, forbidden_identities, identity_claims  # noqa: F401

# The longest correction text: the bot refuses longer ones when they are made or edited, and
# calibrate refuses to train one (an older store may hold one; issue 29: one of 108,000
# characters stopped every retrain).
MAX_CORRECTION_CHARS = 2000
REPORT_FILE = "eval.json"  # the gate's full report, inside the version's directory
CHART_FILE = "eval.png"  # scores of every evaluated version


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1  # a bug or an environment failure: the stderr tail says what
    USER = 2  # a problem the user can fix: config, data, registry
    GATE_FAILED = 3  # `eval` (or bootstrap) ran, and the candidate did not pass


class EventKind(StrEnum):
    PHASE = "phase"  # a named step started (loading, scoring, ...): {"phase", "message"}
    PROGRESS = "progress"  # {"stage", "step", "total", "loss", "tokens_per_s", "eta_s"}
    DONE = "done"
    ERROR = "error"


class Command(StrEnum):
    ANCHOR = "anchor"
    GENERALIZE = "generalize"
    CALIBRATE = "calibrate"
    EVAL = "eval"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    IMPORT = "import"
    LIST = "list"
    BOOTSTRAP = "bootstrap"
    CHECK = "check"


class Verdict(StrEnum):
    PASSED = "passed"
    FAILED = "failed"


class VersionStatus(StrEnum):
    """A registry version's manifest "status" (trainer.registry; `list` rows, /status)."""

    CANDIDATE = "candidate"  # new: not gated, or gated and passed but not promoted
    REJECTED = "rejected"  # its gate failed
    PROMOTED = "promoted"  # live now
    SUPERSEDED = "superseded"  # was live; a newer one was promoted
    ROLLED_BACK = "rolled_back"  # was live; an admin rolled away from it
    BROKEN = "broken"  # only in `list` rows: the manifest cannot be read


# Versions that were live at some time (the gate's reference is the nearest of these).
EVER_LIVE = (VersionStatus.PROMOTED, VersionStatus.SUPERSEDED, VersionStatus.ROLLED_BACK)


def now_iso() -> str:
    """The one timestamp format of the project: UTC, seconds, ISO 8601."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---- payloads: every JSON object that crosses the boundary, typed once -------------------------
# A payload is a frozen dataclass whose fields are its JSON keys. The writer builds one and
# sends `as_dict()` (`as_event()` for an event); the reader takes it back with `from_dict()`
# (`from_event()`), which gives None, never an exception, for an object that lacks a required
# key or holds the wrong kind of value there.


def _str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _float(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def _bool(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _dict(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {value!r}")
    return value


def _list(value) -> list:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return value


def _optional(parse: Callable[[Any], T]) -> Callable[[Any], Optional[T]]:
    return lambda value: None if value is None else parse(value)


def _each(parse: Callable[[Any], T]) -> Callable[[Any], tuple[T, ...]]:
    return lambda value: tuple(parse(item) for item in _list(value))


def _plain(value):
    if isinstance(value, Payload):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


P = TypeVar("P", bound="Payload")
T = TypeVar("T")


class Payload:
    """Base of the payload dataclasses: PARSE checks (and converts) a field's JSON value;
    OMIT_EMPTY names fields left out of the object when None or empty."""

    PARSE: ClassVar[dict[str, Callable[[Any], Any]]] = {}
    OMIT_EMPTY: ClassVar[tuple[str, ...]] = ()

    def as_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.OMIT_EMPTY and (value is None or (isinstance(value, (tuple, list)) and not value)):
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[P], data) -> Optional[P]:
        if not isinstance(data, dict):
            return None
        given = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    return None
                continue
            parse = cls.PARSE.get(f.name)
            try:
                given[f.name] = parse(data[f.name]) if parse else data[f.name]
            except (TypeError, ValueError):
                return None
        return cls(**given)


class Event(Payload):
    """A JSON line of `--progress json`: {"event": KIND, **fields}."""

    KIND: ClassVar[EventKind]

    def as_event(self) -> dict:
        return {"event": self.KIND, **self.as_dict()}

    @classmethod
    def from_event(cls: type[P], data) -> Optional[P]:
        return cls.from_dict(data) if isinstance(data, dict) and data.get("event") == cls.KIND else None


@dataclass(frozen=True)
class CorrectionRecord(Payload):
    """One approved correction: a line of the JSONL file the bot exports for `calibrate
    --corrections` (bot.store.Store.export_approved_corrections writes it,
    trainer.corrections.parse_correction reads it). Required: id, messages (the prompt the model
    answered, system first, ending with the user's question) and correction (the right answer)."""

    id: int
    messages: list
    correction: str
    exchange_id: Optional[int] = None
    bad_answer: Optional[str] = None  # what the model answered
    user_id: Optional[int] = None  # who wrote the correction
    approved_by: Optional[int] = None
    created_at: Optional[str] = None  # ISO 8601
    approved_at: Optional[str] = None  # ISO 8601; the latest approved correction of a question wins

    REQUIRED: ClassVar[dict[str, type]] = {"id": int, "messages": list, "correction": str}
    PARSE = {"id": _int, "messages": _list, "correction": _str, "exchange_id": _optional(_int),
             "bad_answer": _optional(_str), "user_id": _optional(_int), "approved_by": _optional(_int)}

    @classmethod
    def parse(cls, row) -> "CorrectionRecord":
        """The record in `row`, or a ValueError naming the key that is missing or wrong (the
        trainer puts the file and line in front of it)."""
        if not isinstance(row, dict):
            raise ValueError("each line must be a JSON object")
        for key, kind in cls.REQUIRED.items():
            if key not in row:
                raise ValueError(f"missing '{key}'")
            if not isinstance(row[key], kind) or isinstance(row[key], bool):
                raise ValueError(f"'{key}' must be {kind.__name__}, got {type(row[key]).__name__}")
        return cls(**{f.name: row.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class RefusedCorrection(Payload):
    """A correction the trainer will not train, and why ("it claims another identity (chatgpt)")."""

    id: int
    correction: str
    reason: str

    def as_event(self) -> dict:
        return self.as_dict()

    @classmethod
    def from_event(cls, item) -> Optional["RefusedCorrection"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or isinstance(item.get("id"), bool):
            return None
        return cls(item["id"], str(item.get("correction") or ""), str(item.get("reason") or "no reason given"))


@dataclass(frozen=True)
class PhaseEvent(Event):
    """A named step begins (loading the base, scoring, promoting): shown while nothing counts."""

    KIND = EventKind.PHASE
    PARSE = {"phase": _str, "message": _str}

    phase: str
    message: str


@dataclass(frozen=True)
class ProgressEvent(Event):
    """Training steps: step 0 as soon as a stage's plan is known, then after optimizer steps
    (at most every trainer.progress.JSON_MIN_INTERVAL_S). None: not known (yet)."""

    KIND = EventKind.PROGRESS
    PARSE = {"stage": _str, "step": _int, "total": _int, "loss": _optional(_float),
             "tokens_per_s": _optional(_float), "eta_s": _optional(_float)}

    stage: str
    step: int
    total: int
    loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    eta_s: Optional[float] = None


@dataclass(frozen=True)
class ErrorEvent(Event):
    """The final event of a run that did not do its job."""

    KIND = EventKind.ERROR
    PARSE = {"message": _str, "exit_code": _optional(_int),
             "refused_corrections": lambda v: tuple(r for r in map(RefusedCorrection.from_event, _list(v)) if r)}
    OMIT_EMPTY = ("exit_code", "refused_corrections")

    message: str
    exit_code: Optional[int] = None
    # calibrate only: the corrections it will not train (it stopped before loading a model)
    refused_corrections: tuple[RefusedCorrection, ...] = ()


@dataclass(frozen=True, kw_only=True)
class DoneEvent(Event):
    """The final event of a run that did its job: what every `done` event carries. Each command's
    own class (DONE_EVENTS) adds the rest."""

    KIND = EventKind.DONE
    PARSE = {"command": Command, "version": _optional(_str)}
    OMIT_EMPTY = ("version",)

    command: Command
    version: Optional[str] = None  # the version the command made, gated or made live


@dataclass(frozen=True, kw_only=True)
class TrainDone(DoneEvent):
    """anchor, generalize, calibrate: the new candidate version."""

    PARSE = {**DoneEvent.PARSE, "version": _str, "path": _str, "stage": _str, "parent": _optional(_str),
             "samples": _dict, "train": _dict}

    version: str
    path: str  # the version's adapter directory
    stage: str
    parent: Optional[str]  # the version it continued from (None: a fresh LoRA on the base)
    samples: dict  # counts, as in the manifest
    train: dict  # run statistics, as in the manifest


@dataclass(frozen=True, kw_only=True)
class CheckedCorrection(Payload):
    """A correction the gate asked the candidate, and whether its answer stated it."""

    PARSE = {"id": _int, "learned": _bool, "question": _optional(_str), "correction": _optional(_str),
             "answer": _optional(_str)}

    id: int
    learned: bool
    question: Optional[str] = None
    correction: Optional[str] = None
    answer: Optional[str] = None  # what the candidate answered


@dataclass(frozen=True, kw_only=True)
class EvalDone(DoneEvent):
    """eval: the gate's verdict on `version` (exit code 3 when it failed)."""

    PARSE = {**DoneEvent.PARSE, "version": _str, "path": _str, "verdict": Verdict, "passed": _bool,
             "reference": _optional(_str), "checks": _list, "metrics": _dict, "report": _str,
             "chart": _optional(_str), "corrections": _each(lambda c: _checked(CheckedCorrection.from_dict(c))),
             "learned": _each(_int), "not_learned": _each(_int)}

    version: str
    path: str
    verdict: Verdict
    passed: bool
    reference: Optional[str]  # the version it was compared with ("base": the base model)
    checks: list  # [{"name", "value", "op", "limit", "passed"}]
    metrics: dict  # the summary recorded in the manifest
    report: str  # path of eval.json, the full report
    chart: Optional[str]  # path of eval.png (None: not drawn)
    corrections: tuple[CheckedCorrection, ...] = ()
    learned: tuple[int, ...] = ()  # ids
    not_learned: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PointerDone(DoneEvent):
    """promote (version: live now, previous: what PROMOTED said before) and rollback (version:
    live now, previous: the version rolled away from)."""

    PARSE = {**DoneEvent.PARSE, "version": _str, "path": _str, "previous": _optional(_str)}

    version: str
    path: str
    previous: Optional[str]


@dataclass(frozen=True, kw_only=True)
class ImportDone(DoneEvent):
    """import: the outside adapter registered as a candidate version."""

    PARSE = {**DoneEvent.PARSE, "version": _str, "path": _str, "source": _str}

    version: str
    path: str
    source: str


@dataclass(frozen=True, kw_only=True)
class ListDone(DoneEvent):
    """list: one row per version (trainer.registry.Registry.describe)."""

    PARSE = {**DoneEvent.PARSE, "versions": _list}

    versions: list


@dataclass(frozen=True, kw_only=True)
class CheckDone(DoneEvent):
    """check: what the registry check repaired (empty: nothing needed it)."""

    PARSE = {**DoneEvent.PARSE, "repaired": _each(_str)}

    repaired: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class BootstrapDone(DoneEvent):
    """bootstrap: `version` is promoted. When this run trained it, the gate's outcome rides along,
    its fields beside these in the same object (as an eval `done` event's); None: it was
    bootstrapped before."""

    PARSE = {**DoneEvent.PARSE, "version": _str, "path": _str, "stage": _str, "promoted": _bool}

    version: str
    path: str
    stage: str = Command.BOOTSTRAP
    promoted: bool = True
    gate: Optional[EvalDone] = None

    def as_dict(self) -> dict:
        own = {k: v for k, v in super().as_dict().items() if k != "gate"}
        return {**(self.gate.as_dict() if self.gate else {}), **own}

    @classmethod
    def from_dict(cls, data) -> Optional["BootstrapDone"]:
        gate = EvalDone.from_dict(data) if isinstance(data, dict) and "verdict" in data else None
        done = super().from_dict({k: v for k, v in data.items() if k != "gate"} if isinstance(data, dict) else data)
        return done if done is None or gate is None else replace(done, gate=replace(gate, command=Command.EVAL))


def _checked(item: Optional[P]) -> P:
    if item is None:
        raise ValueError("not a payload of its kind")
    return item


DONE_EVENTS: dict[Command, type[DoneEvent]] = {
    Command.ANCHOR: TrainDone, Command.GENERALIZE: TrainDone, Command.CALIBRATE: TrainDone,
    Command.EVAL: EvalDone, Command.PROMOTE: PointerDone, Command.ROLLBACK: PointerDone,
    Command.IMPORT: ImportDone, Command.LIST: ListDone, Command.BOOTSTRAP: BootstrapDone, Command.CHECK: CheckDone,
}


def parse_event(data) -> Optional[Event]:
    """One JSON line of a trainer as its event type; None if it is none of them. A `done` event
    that lacks its command's fields is read as its header (DoneEvent: command and version)."""
    if not isinstance(data, dict):
        return None
    kind = data.get("event")
    if kind == EventKind.DONE:
        own = DONE_EVENTS.get(data.get("command")) if isinstance(data.get("command"), str) else None
        return (own.from_event(data) if own else None) or DoneEvent.from_event(data)
    kinds: dict[str, type[Event]] = {EventKind.PHASE: PhaseEvent, EventKind.PROGRESS: ProgressEvent,
                                     EventKind.ERROR: ErrorEvent}
    return kinds[kind].from_event(data) if kind in kinds else None


E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class Outcome:
    """How one trainer run ended, read from its final event and exit code."""

    command: str
    exit_code: int
    event: dict = field(default_factory=dict)  # the final done/error event as it came ({} if none came)
    stderr_tail: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.event.get("event") == EventKind.DONE and self.exit_code in (ExitCode.OK, ExitCode.GATE_FAILED)

    def done_as(self, kind: type[E]) -> Optional[E]:
        """The final event read as `kind` (TrainDone, EvalDone, PointerDone, ...); None when the
        run did not end with one of that shape."""
        return kind.from_event(self.event)

    @property
    def version(self) -> Optional[str]:
        """The version the final `done` event names (None: none)."""
        done = self.done_as(DoneEvent)
        return done.version if done else None

    @property
    def verdict(self) -> Optional[Verdict]:
        gate = self.done_as(EvalDone)
        return gate.verdict if gate else None

    def get(self, key: str, default: Any = None) -> Any:
        """A key of the final event as it came (the typed read is `done_as`)."""
        return self.event.get(key, default)

    @property
    def refused_corrections(self) -> list[RefusedCorrection]:
        """The corrections a failed run named as the reason it failed (empty: none was to blame)."""
        error = self.done_as(ErrorEvent)
        return list(error.refused_corrections) if error else []

    @property
    def reason(self) -> str:
        """Why it failed: the trainer's own words; else the signal that killed it (its last
        stderr line is then only a log line, not the cause); else that line or the exit status."""
        error = self.done_as(ErrorEvent)
        if error and error.message:
            return error.message
        if self.exit_code < 0:
            return killed_by(-self.exit_code)
        if self.stderr_tail:
            return self.stderr_tail[-1]
        return f"exit status {self.exit_code}"


def killed_by(signum: int) -> str:
    """A trainer process ended by a signal, in words."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    hint = ", e.g. by the kernel's out-of-memory killer" if signum == signal.SIGKILL else ""
    return f"the trainer process was killed by {name}{hint}"
