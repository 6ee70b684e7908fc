"""The trainer's public contract with whoever runs it (the bot, a script, CI).

`python -m trainer COMMAND --progress json` prints one JSON object per line on
stdout and nothing else. Every run ends with exactly one final event:

    {"event": "done", "command": ..., ...}      the command did its job
    {"event": "error", "message": ..., "exit_code": N}   it did not

and exits with an `ExitCode`. Before the first training step there is always a
`phase` event, so a slow start never looks like a hang. What each command's
`done` event carries (the bot needs nothing else):

    calibrate/anchor/generalize  version, path, stage, parent, samples, train
    eval        version, verdict ("passed"/"failed"), passed, reference, metrics,
                checks, report (path of eval.json), chart (path of eval.png),
                learned / not_learned (the corrections checked, by id)
    promote     version, path, previous
    rollback    version (live now), path, previous (rolled away from)
    import      version, path, source

A failed gate is a `done` event with verdict "failed" and exit code 3. A calibrate that will
not train some corrections (too long, claiming another identity) ends, before loading any
model, in an error event (exit code 2) that also carries "refused_corrections": [{"id",
"correction", "reason"}, ...] (`RefusedCorrection`), so the caller can name them to whoever
can reject or edit them.
This module imports nothing heavy: the bot imports it (and trainer.registry's
read API), never the trainer's internals.
"""

from __future__ import annotations

import datetime as dt
import signal
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Optional

# What counts as the assistant claiming another identity: one definition for the gate and for
# the bot's review of corrections (pure functions, standard library only).
from trainer.matching import DEFAULT_FORBIDDEN_IDENTITIES, forbidden_identities, identity_claims  # noqa: F401

# The longest correction text: the bot refuses longer ones when they are made or edited, and
# calibrate refuses to train one (an older store may hold one; issue 29: one of 108,000
# characters stopped every retrain).
MAX_CORRECTION_CHARS = 2000
REFUSED_CORRECTIONS = "refused_corrections"  # the error event's list of RefusedCorrection
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


@dataclass(frozen=True)
class RefusedCorrection:
    """A correction the trainer will not train, and why ("it claims another identity (chatgpt)")."""

    id: int
    correction: str
    reason: str

    def as_event(self) -> dict:
        return {"id": self.id, "correction": self.correction, "reason": self.reason}

    @classmethod
    def from_event(cls, item) -> Optional["RefusedCorrection"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or isinstance(item.get("id"), bool):
            return None
        return cls(item["id"], str(item.get("correction") or ""), str(item.get("reason") or "no reason given"))


@dataclass(frozen=True)
class Outcome:
    """How one trainer run ended, read from its final event and exit code."""

    command: str
    exit_code: int
    event: dict = field(default_factory=dict)  # the final done/error event ({} if none came)
    stderr_tail: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.event.get("event") == EventKind.DONE and self.exit_code in (ExitCode.OK, ExitCode.GATE_FAILED)

    @property
    def version(self) -> Optional[str]:
        return self.event.get("version")

    @property
    def verdict(self) -> Optional[Verdict]:
        v = self.event.get("verdict")
        return Verdict(v) if v in tuple(Verdict) else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.event.get(key, default)

    @property
    def refused_corrections(self) -> list[RefusedCorrection]:
        """The corrections a failed run named as the reason it failed (empty: none was to blame)."""
        if self.event.get("event") != EventKind.ERROR or not isinstance(self.event.get(REFUSED_CORRECTIONS), list):
            return []
        return [r for r in map(RefusedCorrection.from_event, self.event[REFUSED_CORRECTIONS]) if r is not None]

    @property
    def reason(self) -> str:
        """Why it failed: the trainer's own words; else the signal that killed it (its last
        stderr line is then only a log line, not the cause); else that line or the exit status."""
        if self.event.get("message"):
            return str(self.event["message"])
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
