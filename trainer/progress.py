"""Progress reporting for training stages: tqdm on a terminal, JSON lines for the bot.

`--progress json` prints exactly one JSON object per line on stdout, each built from its
type in trainer.protocol (the contract):
  PhaseEvent      {"event":"phase","phase","message"}             a named step begins
  ProgressEvent   {"event":"progress","stage","step","total","loss","tokens_per_s","eta_s"}
                  (step 0 as soon as a stage's plan is known, before its first slow step)
  DoneEvent       {"event":"done","command","version",...}       one class per command
  ErrorEvent      {"event":"error","message","exit_code"[,"refused_corrections"]}
Exactly one done/error event ends a run (later ones are dropped). Everything else
(logs, warnings) goes to stderr, so stdout stays parseable.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Optional, Sequence

from trainer.protocol import DoneEvent, ErrorEvent, Event, EventKind, PhaseEvent, ProgressEvent, RefusedCorrection

MODES = ("auto", "tqdm", "json", "none")
# JSON progress lines at most this often (the bot edits a Discord message with them).
JSON_MIN_INTERVAL_S = 0.5


def _num(x: float, digits: int = 4):
    return None if x is None or not math.isfinite(x) else round(x, digits)


class Progress:
    def __init__(self, mode: str = "auto", stream=None):
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

    def emit(self, event: Event) -> None:
        if self.finished:
            return
        if event.KIND in (EventKind.DONE, EventKind.ERROR):
            self.finished = True
        if self.mode == "json":
            self.out.write(json.dumps(event.as_event(), ensure_ascii=False) + "\n")
            self.out.flush()

    def start(self, stage: str, total: int) -> None:
        self.stage, self.total = stage, total
        self._start, self._tokens = time.time(), 0
        if self.mode == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit="step", file=sys.stderr)
        # Step 0: the plan is known; the first optimizer step may be a long way off on a CPU.
        self.emit(ProgressEvent(stage, 0, total))

    def phase(self, phase: str, message: str) -> None:
        """A named step begins (loading the base, scoring, promoting): shown while nothing counts."""
        self.emit(PhaseEvent(phase, message))
        if self.mode == "tqdm":
            log(message)

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
