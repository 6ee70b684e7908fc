"""Progress reporting for training stages: tqdm on a terminal, JSON lines for the bot.

`--progress json` prints exactly one JSON object per line on stdout, each built from its
type in trainer.protocol (the contract):
  PhaseEvent      {"event":"phase","phase","message"}             a named step begins
  ProgressEvent   {"event":"progress","stage","step","total","loss","tokens_per_s","eta_s"}
                  (step 0 as soon as a stage's plan is known, before its first slow step)
  DoneEvent       {"event":"done","command","version",...}       one class per command
  ErrorEvent      {"event":"error","message","exit_code"[,"refused_corrections"]}
Exactly one done/error event ends a run (later ones are dropped). Everything else
(logs, warnings) goes to stderr, so stdout stays parseable. A phase that goes on with
nothing else said (the gate asking its questions: minutes on a CPU) is said again every
HEARTBEAT_S seconds with how long it has taken, so a log on a pipe never sits silent.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import Optional, Sequence

from trainer.protocol import DoneEvent, ErrorEvent, Event, EventKind, PhaseEvent, ProgressEvent, RefusedCorrection

MODES = ("auto", "tqdm", "json", "none")
# JSON progress lines at most this often (the bot edits a Discord message with them).
JSON_MIN_INTERVAL_S = 0.5
# A phase with no other event is repeated this often (the bot's pipe display wants a line every 30 s).
HEARTBEAT_S = 20.0


def _num(x: float, digits: int = 4):
    return None if x is None or not math.isfinite(x) else round(x, digits)


class Progress:
    def __init__(self, mode: str = "auto", stream=None, heartbeat_s: float = HEARTBEAT_S):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "none"
        self.mode = mode
        self.out = stream or sys.stdout
        self._bar = None
        self._last_emit = 0.0
        self.stage = ""
        self.total = 0
        self._start = time.time()
        self._tokens = 0
        self.finished = False  # a done/error event went out: nothing more may follow it
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()  # the heartbeat thread emits too
        self._said_at = time.monotonic()  # when the last event went out
        self._phase: Optional[tuple[str, str, float]] = None  # the phase under way: (phase, message, since)
        self._heartbeat: Optional[threading.Thread] = None
        self._stopped = threading.Event()

    def emit(self, event: Event) -> None:
        with self._lock:
            if self.finished:
                return
            if event.KIND in (EventKind.DONE, EventKind.ERROR):
                self.finished = True
                self._stopped.set()
            self._said_at = time.monotonic()
            if self.mode == "json":
                self.out.write(json.dumps(event.as_event(), ensure_ascii=False) + "\n")
                self.out.flush()

    def start(self, stage: str, total: int) -> None:
        self.stage, self.total = stage, total
        self._start, self._tokens = time.time(), 0
        self._phase = None  # a stage counts its own steps
        if self.mode == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit="step", file=sys.stderr)
        # Step 0: the plan is known; the first optimizer step may be a long way off on a CPU.
        self.emit(ProgressEvent(stage, 0, total))

    def phase(self, phase: str, message: str) -> None:
        """A named step begins (loading the base, scoring, promoting): shown while nothing counts."""
        self._phase = (phase, message, time.monotonic())
        self.emit(PhaseEvent(phase, message))
        if self.mode == "tqdm":
            log(message)
        if self._heartbeat is None and self.mode in ("json", "tqdm"):
            self._heartbeat = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
            self._heartbeat.start()

    def _beat(self) -> None:
        """Say the phase under way again when nothing was said for `heartbeat_s`."""
        while not self._stopped.wait(min(1.0, self.heartbeat_s / 4)):
            current, now = self._phase, time.monotonic()
            if current is None or now - self._said_at < self.heartbeat_s:
                continue
            phase, message, since = current
            text = f"{message} (still at it, {now - since:.0f} s)"
            self.emit(PhaseEvent(phase, text))
            if self.mode == "tqdm":
                log(text)

    def step(self, step: int, loss: float, tokens: Optional[int]) -> None:
        """Called after optimizer step `step` (1-based) with its loss and tokens processed
        (None: not counted; tokens_per_s is then null)."""
        self._tokens += tokens or 0
        elapsed = max(time.time() - self._start, 1e-9)
        tps = self._tokens / elapsed if tokens is not None else None
        eta = elapsed / step * (self.total - step) if step else None
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", **({"tok_s": f"{tps:.0f}"} if tps is not None else {}))
        now = time.time()
        if step == self.total or now - self._last_emit >= JSON_MIN_INTERVAL_S or step == 1:
            self._last_emit = now
            self.emit(ProgressEvent(self.stage, step, self.total, _num(loss), _num(tps, 1), _num(eta, 1)))

    def close(self) -> None:
        self._phase = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def done(self, event: DoneEvent) -> None:
        """The final event of a run that did its job: the command's own DoneEvent class."""
        self.close()
        self.emit(event)

    def error(self, message: str, exit_code: Optional[int] = None,
              refused: Sequence[RefusedCorrection] = ()) -> None:
        """The final error event; `refused`: the corrections calibrate will not train."""
        self.close()
        self.emit(ErrorEvent(message, None if exit_code is None else int(exit_code), tuple(refused)))


def log(message: str) -> None:
    """A log line for humans: always stderr."""
    print(message, file=sys.stderr, flush=True)


def elapsed_since(start: float) -> float:
    return round(time.time() - start, 2)


def make(mode: Optional[str]) -> Progress:
    return Progress(mode or "auto")
