"""Terminal mode: the whole product without Discord (`python -m bot` with no token).

Chat with the assistant (answers stream), flag the last answer, suggest a
correction, review corrections, retrain, roll back and see the status — through
the same `Runtime`, core and admin operations the Discord commands use. The
person at the terminal is the admin. It behaves like the chat CLIs people know
(`ollama run`, `llm chat`):

- logs (ours, the worker's and the trainer's) go to `bot.log` in the data
  directory, never into the chat (`--verbose` shows them on the terminal);
- a long step (first-run build, retrain) is one live tqdm bar per stage;
- Ctrl-C cancels the answer or retrain under way and says so; Ctrl-C at the
  prompt (or a second one while cancelling) quits at once; Ctrl-D quits too;
- line editing and input history (readline, saved in the data directory).

Works on a pipe as well as a TTY, so it can be scripted
(`printf 'hello\\n/status\\n' | python -m bot`): no prompt, no bars, one line
per stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Optional, TextIO

from tqdm import tqdm

from model.config import Config
from trainer.protocol import EventKind

from bot import admin
from bot.context import Turn, fit_question
from bot.core import FeedbackError, Request
from bot.memory import TERMINAL_SCOPE, fact_of
from bot.retrain import RetrainRefused, format_progress, summarize_report
from bot.runtime import BootstrapError, Runtime, data_dir
from bot.store import AnswerStatus, CorrectionStatus, RunTrigger, StoreError
from bot.supervisor import WorkerStartError

log = logging.getLogger(__name__)

LOCAL_USER_ID = 0  # the person at the terminal (an admin)
LOCAL_AUTHOR = "you (terminal)"  # how the terminal's own corrections are labelled in reviews
PROMPT = "you> "
LOG_FILE = "bot.log"  # in the data directory
HISTORY_FILE = "history"  # readline history, in the data directory
HISTORY_LENGTH = 1000
MEMORY_LIST_LIMIT = 20  # facts /memory shows
EXIT_INTERRUPTED = 130  # the shell's convention for "ended by Ctrl-C"
HELP = """\
Type a message to chat. Commands:
  /flag                 mark the last answer as wrong (like a 👎)
  /good                 mark the last answer as good (like a 👍)
  /correct TEXT         suggest the right answer for the last answer
  /corrections [PAGE]   pending corrections
  /approve ID [TEXT]    approve a correction (optionally with edited text)
  /reject ID            reject a correction
  /reopen ID            put a reviewed correction back to pending
  /memory [TEXT]        the facts approved corrections taught (the closest to TEXT)
  /retract ID           take a fact out of the memory and out of later training
  /retrain              train on approved corrections, gate, and hot-swap
  /rollback [VERSION]   go back to the previous (or given) adapter version
  /status               model, live adapter, worker, feedback and last run
  /new                  start a new conversation
  /forget-me            delete everything stored about you
  /help, /quit          (Ctrl-C cancels an answer or a retrain; Ctrl-D quits)"""


def local_message_id() -> int:
    """Ids for answers shown in the terminal: negative, so they never clash with Discord's."""
    return -time.time_ns() // 1000


# ------------------------------------------------------------------ progress


PIPE_LINE_EVERY_S = 30.0  # on a pipe, a long stage says where it is at least this often


class ProgressDisplay:
    """Trainer progress events (JSON lines relayed by the runtime) as one live tqdm bar per
    stage on a terminal; on a pipe, one line when a stage starts and one when it ends, and one
    every `every_s` seconds in between, so a log never sits silent for minutes."""

    def __init__(self, out: TextIO, live: bool, every_s: float = PIPE_LINE_EVERY_S):
        self.out, self.live, self.every_s = out, live, every_s
        self.bar: Optional[tqdm] = None
        self.stage: Optional[str] = None
        self.last: dict = {}
        self._said_at, self._said = time.monotonic(), ""  # when and what the pipe was last told

    async def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == EventKind.PROGRESS:
            self._progress(event)
        elif kind in (EventKind.PHASE, EventKind.DONE, EventKind.ERROR):
            self.close()
            self._line(format_progress(event))

    def _progress(self, event: dict) -> None:
        stage, total = event.get("stage") or "training", int(event.get("total") or 0)
        if stage != self.stage:
            self.close()
            self.stage = stage
            if self.live:
                self.bar = tqdm(total=total or None, desc=f"🛠️ {stage}", unit="step", file=self.out,
                                dynamic_ncols=True, leave=True, mininterval=0.2)
            else:
                self._line(f"🛠️ {stage}: {total} steps…")
        self.last = event
        if not self.live and time.monotonic() - self._said_at >= self.every_s:
            self._line(self._where())
        if self.bar is not None:
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.n = int(event.get("step") or 0)
            if event.get("loss") is not None:
                self.bar.set_postfix(loss=f"{float(event['loss']):.3f}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        """End the current stage's bar (or, on a pipe, say where the stage got to)."""
        if self.bar is not None:
            self.bar.close()
        elif self.stage is not None and not self.live and self.last and self._said != self._where():
            self._line(self._where())
        self.bar, self.stage, self.last = None, None, {}

    def _where(self) -> str:
        loss = self.last.get("loss")
        return (f"🛠️ {self.stage}: step {self.last.get('step')}/{self.last.get('total')}"
                + (f" · loss {float(loss):.3f}" if loss is not None else ""))

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
        self._said_at, self._said = time.monotonic(), text


# ------------------------------------------------------------------ the chat


class Terminal:
    """One terminal conversation driving a Runtime."""

    def __init__(self, runtime: Runtime, out: TextIO = sys.stdout, live_progress: bool = False):
        self.runtime = runtime
        self.core = runtime.core
        self.out = out
        self.live_progress = live_progress
        self.turns: list[Turn] = []
        self.last_answer_id: Optional[int] = None
        self.at_line_start = True
        self.commands: dict[str, Callable[[list[str], str], Awaitable[None]]] = {
            "/help": self.cmd_help, "/flag": self.cmd_flag, "/good": self.cmd_good,
            "/correct": self.cmd_correct, "/corrections": self.cmd_corrections,
            "/approve": self.cmd_approve, "/reject": self.cmd_reject, "/reopen": self.cmd_reopen,
            "/memory": self.cmd_memory, "/retract": self.cmd_retract,
            "/retrain": self.cmd_retrain, "/rollback": self.cmd_rollback, "/status": self.cmd_status,
            "/new": self.cmd_new, "/forget-me": self.cmd_forget_me,
        }

    def say(self, text: str = "", end: str = "\n") -> None:
        written = text + end
        if written:
            self.out.write(written)
            self.out.flush()
            self.at_line_start = written.endswith("\n")

    def end_line(self) -> None:
        """Finish a half-written line (an answer cut by Ctrl-C) before saying more."""
        if not self.at_line_start:
            self.say()

    @staticmethod
    def activity(line: str) -> str:
        """What Ctrl-C would cancel for this input line, in words: "answer", "retrain", "/status"…"""
        line = line.strip()
        if not line.startswith("/"):
            return "answer"
        command = line.partition(" ")[0]
        return "retrain" if command == "/retrain" else command

    async def handle(self, line: str) -> bool:
        """Act on one input line; False means quit."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if not line.startswith("/"):
            await self.chat(line)
            return True
        name, _, rest = line.partition(" ")
        command = self.commands.get(name)
        if command is None:
            self.say(f"Unknown command {name}. /help lists them.")
            return True
        try:
            await command(rest.split(), rest.strip())
        except (FeedbackError, admin.AdminError, RetrainRefused) as exc:
            self.say(str(exc))
        except StoreError as exc:  # e.g. a full disk: say so and keep the chat open
            log.error("store error: %s", exc)
            self.say(f"⚠️ {exc}")
        except ValueError as exc:
            self.say(f"{exc}. /help shows the usage.")
        return True

    # -------------------------------------------------------------- chat

    async def chat(self, text: str) -> None:
        fitted = fit_question(text, self.core.question_budget())
        if fitted.notice:
            self.say(fitted.notice)
        request = Request(user_id=LOCAL_USER_ID,
                          turns=self.turns + [Turn("user", fitted.text, author_id=LOCAL_USER_ID)])
        stream = self.core.answer(request)
        self.say(f"{self.runtime.cfg.identity.name}> ", end="")
        async for delta in stream:
            self.say(delta, end="")
        result = stream.result
        if result.status != AnswerStatus.COMPLETE:
            self.say(result.display[len(result.text):], end="")
        self.say()
        footer = admin.memory_footer(result.sources, result.quoted, author_label)
        if footer:
            self.say(footer)
        answer_id = local_message_id()
        await self.core.record(request, result, [answer_id])
        if result.status != AnswerStatus.ERROR:
            self.turns = request.turns + [Turn("assistant", result.text, message_id=answer_id)]
            self.last_answer_id = answer_id

    def need_answer(self) -> int:
        if self.last_answer_id is None:
            raise FeedbackError("There is no answer yet: ask something first.")
        return self.last_answer_id

    # ---------------------------------------------------------- feedback

    async def cmd_flag(self, args, rest) -> None:
        await self.core.react(self.need_answer(), LOCAL_USER_ID, self.runtime.cfg.discord.flag_reactions[0])
        self.say("Flagged. Tell me the right answer with /correct TEXT.")

    async def cmd_good(self, args, rest) -> None:
        await self.core.react(self.need_answer(), LOCAL_USER_ID, self.runtime.cfg.discord.good_reactions[0])
        self.say("Thanks, noted.")

    async def cmd_correct(self, args, rest) -> None:
        correction = await self.core.suggest_correction(self.need_answer(), LOCAL_USER_ID, rest)
        self.say(f"Correction #{correction['id']} saved as {correction['status']}. "
                 f"Approve it with /approve {correction['id']}.")
        warning = admin.identity_warning(correction.get("claims") or ())
        if warning:
            self.say(warning)

    async def cmd_forget_me(self, args, rest) -> None:
        report = await self.core.forget_me(LOCAL_USER_ID)
        self.turns, self.last_answer_id = [], None
        self.say(report.message())

    async def cmd_new(self, args, rest) -> None:
        self.turns, self.last_answer_id = [], None
        self.say("New conversation.")

    # ------------------------------------------------------------- admin

    async def cmd_corrections(self, args, rest) -> None:
        if args and not args[0].isdigit():
            raise ValueError("give a page number, e.g. /corrections 2")
        page = int(args[0]) - 1 if args else 0
        views, pages = await admin.pending_page(self.core.store, page, self.runtime.cfg)
        if not views:
            self.say("No pending corrections.")
            return
        for view in views:
            self.say(view.render(author_label(view.user_id)).replace("**", ""))
            self.say()
        self.say(f"Page {min(page, pages - 1) + 1}/{pages}. /approve ID or /reject ID.")

    async def cmd_approve(self, args, rest) -> None:
        cid, text = _id_and_text(args, rest)
        view = await admin.review(self.core.store, cid, CorrectionStatus.APPROVED, LOCAL_USER_ID, text=text, cfg=self.runtime.cfg,
                                  memory=self.core.memory)
        self.say(f"Correction #{view.id} approved: "
                 + ("it answers from now on (/memory lists the facts); /retrain makes it part of the model."
                    if self.core.memory.on else "/retrain to learn it."))
        if view.warning:
            self.say(f"{view.warning} /reject {view.id} if that was not intended.")

    async def cmd_reject(self, args, rest) -> None:
        cid, _ = _id_and_text(args, rest)
        view = await admin.review(self.core.store, cid, CorrectionStatus.REJECTED, LOCAL_USER_ID)
        self.say(f"Correction #{view.id} rejected.")

    async def cmd_reopen(self, args, rest) -> None:
        cid, _ = _id_and_text(args, rest, command="/reopen")
        view = await admin.reopen(self.core.store, cid)
        self.say(f"Correction #{view.id} is pending again: /approve {view.id} or /reject {view.id}.")

    async def cmd_memory(self, args, rest) -> None:
        memory = self.core.memory
        if not memory.on:
            self.say(admin.memory_line(memory, 0).replace("**", ""))
            return
        if rest:
            facts = await memory.search(TERMINAL_SCOPE, rest, MEMORY_LIST_LIMIT)
        else:
            entries = await self.core.store.memory_entries(TERMINAL_SCOPE)
            facts = [fact_of(e) for e in entries[-MEMORY_LIST_LIMIT:]]
        self.say(admin.render_facts(facts, author_label))

    async def cmd_retract(self, args, rest) -> None:
        cid, _ = _id_and_text(args, rest, command="/retract")
        view = await admin.retract(self.core.store, self.core.memory, cid, LOCAL_USER_ID)
        self.say(f"Fact #{view.id} retracted: it no longer answers and later retrains leave it out.")

    async def cmd_retrain(self, args, rest) -> None:
        # Refusals (nothing new, one already running) come before any "Retraining…".
        self.say(f"{await self.runtime.retrainer.announcement()} (Ctrl-C cancels)")
        display = ProgressDisplay(self.out, self.live_progress)
        try:
            result = await self.runtime.retrain(RunTrigger.MANUAL, LOCAL_USER_ID, display)
        finally:
            display.close()
        if result.report:
            self.say(summarize_report(result.report))
        self.say(result.message)
        if result.chart:
            self.say(f"Chart: {result.chart}")

    async def cmd_rollback(self, args, rest) -> None:
        self.say(await self.runtime.rollback(args[0] if args else None))

    async def cmd_status(self, args, rest) -> None:
        self.say((await self.runtime.status()).replace("**", ""))

    async def cmd_help(self, args, rest) -> None:
        self.say(HELP)

    def cancelled(self, activity: str) -> None:
        """Say what a Ctrl-C stopped (the live adapter is named: a retrain may not have changed it)."""
        self.end_line()
        if activity == "retrain":
            live = self.runtime.live.version or "none"
            self.say(f"⏹ Retrain cancelled; the live adapter is {live}. (Ctrl-C again quits.)")
        else:
            self.say(f"⏹ {activity.capitalize()} cancelled. (Ctrl-C again quits.)")


def author_label(user_id: int) -> str:
    """Who submitted a correction, as the terminal shows it (no Discord mention syntax)."""
    return LOCAL_AUTHOR if user_id == LOCAL_USER_ID else f"Discord user {user_id}"


def _id_and_text(args: list[str], rest: str, command: str = "/approve") -> tuple[int, Optional[str]]:
    if not args or not args[0].lstrip("#").isdigit():
        raise ValueError(f"give the correction's number, e.g. {command} 3")
    text = rest.strip()[len(args[0]):].strip()
    return int(args[0].lstrip("#")), (text or None)


# ------------------------------------------------------------------ input


class LineReader:
    """Reads one input line at a time, on request, in a daemon thread.

    A thread because readline's `input()` blocks; a daemon one, asked for one line at
    a time, because a Ctrl-C at the prompt must end the program at once instead of
    waiting for the blocked read to return (an executor thread would be joined at exit).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interactive: bool, history: Optional[Path]):
        self.loop = loop
        self.interactive = interactive
        self.history = history
        self._want = threading.Event()
        self._future: Optional[asyncio.Future] = None
        self._prompt = ""
        if interactive:
            self._setup_readline()
        threading.Thread(target=self._run, name="terminal-input", daemon=True).start()

    def _setup_readline(self) -> None:
        try:
            import readline  # noqa: F401 - importing it gives input() editing and history
        except ImportError:  # e.g. a Python built without it: plain input() still works
            return
        readline.set_history_length(HISTORY_LENGTH)
        if self.history is not None and self.history.exists():
            with contextlib.suppress(OSError):
                readline.read_history_file(self.history)

    def save_history(self) -> None:
        if not self.interactive or self.history is None:
            return
        try:
            import readline

            readline.write_history_file(self.history)
            os.chmod(self.history, 0o600)  # what the admin typed is as private as the store
        except (ImportError, OSError) as exc:
            log.warning("could not save the input history to %s: %s", self.history, exc)

    def next_line(self, prompt: str) -> asyncio.Future:
        """A future for the next line (None at end of input)."""
        self._future = self.loop.create_future()
        self._prompt = prompt
        self._want.set()
        return self._future

    def _deliver(self, line: Optional[str]) -> None:
        def set_result() -> None:
            if self._future is not None and not self._future.done():
                self._future.set_result(line)

        with contextlib.suppress(RuntimeError):  # the loop closed while we were reading
            self.loop.call_soon_threadsafe(set_result)

    def _run(self) -> None:
        while True:
            self._want.wait()
            self._want.clear()
            try:
                if self.interactive:
                    line: Optional[str] = input(self._prompt)
                else:
                    line = sys.stdin.readline()
                    line = line if line else None
            except EOFError:
                line = None
            except (OSError, ValueError):  # stdin closed under us
                line = None
            self._deliver(line)
            if line is None:
                return


# ------------------------------------------------------------------ the session


@dataclass
class Interrupts:
    """Ctrl-C handling: what is running now and how many times Ctrl-C was pressed during it."""

    task: Optional[asyncio.Task] = None  # the command being run (None: at the prompt)
    pressed: int = 0
    quitting: bool = False


class Session:
    """Reads lines, runs each as a task Ctrl-C can cancel, and quits on Ctrl-C at the prompt,
    a second Ctrl-C, Ctrl-D or /quit."""

    def __init__(self, terminal: Terminal, reader: LineReader, interactive: bool):
        self.terminal, self.reader, self.interactive = terminal, reader, interactive
        self.state = Interrupts()
        self._line: Optional[asyncio.Future] = None

    def on_interrupt(self) -> None:
        s = self.state
        if s.task is None or s.pressed >= 1 or s.quitting:
            s.quitting = True  # at the prompt, or a second Ctrl-C: quit now
            if s.task is not None:
                s.task.cancel()
            if self._line is not None and not self._line.done():
                self._line.cancel()
            return
        s.pressed += 1
        s.task.cancel()

    async def run(self) -> int:
        t = self.terminal
        while not self.state.quitting:
            self._line = self.reader.next_line(PROMPT if self.interactive else "")
            t.at_line_start = True  # the prompt line ends with the user's Enter
            try:
                line = await self._line
            except asyncio.CancelledError:
                if not self.state.quitting:
                    raise
                break
            if line is None:  # Ctrl-D / end of the piped input
                if self.interactive:
                    t.say()  # leave the prompt's line before anything else is printed
                return 0
            self.state = Interrupts(task=asyncio.ensure_future(t.handle(line)))
            await asyncio.wait({self.state.task})
            task, quitting = self.state.task, self.state.quitting
            self.state = Interrupts(quitting=quitting)
            if task.cancelled():
                if quitting:
                    break
                t.cancelled(Terminal.activity(line))
            elif task.exception() is not None:  # a bug or a surprise: keep the chat, log the details
                exc = task.exception()
                log.error("command %r failed", line.strip()[:80], exc_info=exc)
                t.end_line()
                t.say(f"⚠️ That failed ({getattr(exc, 'message', None) or exc}); the details are in the log.")
            elif not task.result():
                return 0
        t.end_line()
        if self.interactive:
            t.say()
        return EXIT_INTERRUPTED


# ------------------------------------------------------------------ logging and start-up


def log_path(cfg: Config) -> Path:
    return data_dir(cfg) / LOG_FILE


class QuietTerminal:
    """Sends everything written to file descriptor 2 — our log records, Python warnings, and
    the stderr of child processes (the worker's "Loading weights" bars, transformers'
    FutureWarnings, peft's UserWarnings) — to the log file, keeping the real stderr for the
    few lines the user must see. With `verbose`, nothing is redirected."""

    def __init__(self, path: Path, verbose: bool):
        self.path, self.verbose = path, verbose
        self._saved: Optional[int] = None
        self.user_err: TextIO = sys.stderr

    def __enter__(self) -> "QuietTerminal":
        if self.verbose:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(fd, 2)
        os.close(fd)
        self.user_err = os.fdopen(os.dup(self._saved), "w", buffering=1, encoding="utf-8", errors="replace")
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            sys.stderr.flush()
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = None
            self.user_err.close()
            self.user_err = sys.stderr


@contextlib.contextmanager
def terminal_settings_kept():
    """Put the terminal's settings back however we leave (readline changes them while it reads)."""
    try:
        import termios

        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            raise OSError("not a terminal")
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError, termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run(cfg: Config, err: TextIO = sys.stderr) -> int:
    out = sys.stdout
    interactive = sys.stdin.isatty() and out.isatty()
    loop = asyncio.get_running_loop()
    start = asyncio.current_task()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        # Ctrl-C during start-up (the first-run build, the worker loading) stops it promptly.
        loop.add_signal_handler(signal.SIGINT, start.cancel)

    async def say(text: str) -> None:
        print(text, file=out, flush=True)

    display = ProgressDisplay(out, live=out.isatty())
    try:
        runtime = await Runtime.start(cfg, say=say, progress=display)
    except BootstrapError as exc:
        display.close()
        print(f"error: {exc} (details in {log_path(cfg)})", file=err)
        return 2
    except asyncio.CancelledError:
        display.close()
        print("\nInterrupted during start-up.", file=out, flush=True)
        return EXIT_INTERRUPTED
    display.close()
    terminal = Terminal(runtime, out, live_progress=out.isatty())
    reader = LineReader(loop, interactive, data_dir(cfg) / HISTORY_FILE)
    session = Session(terminal, reader, interactive)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, session.on_interrupt)
    try:
        live = runtime.live.version or "none"
        terminal.say(f"{cfg.identity.name} is ready (adapter {live}). /help lists commands, Ctrl-D quits.")
        return await session.run()
    finally:
        reader.save_history()
        # A third Ctrl-C while the worker shuts down: leave now (the worker dies with us).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, lambda: os._exit(EXIT_INTERRUPTED))
        await runtime.close()


def main(cfg: Config, verbose: bool = False) -> int:
    """Entry point used by `python -m bot` when no Discord token is set."""
    path = log_path(cfg)
    with terminal_settings_kept(), QuietTerminal(path, verbose) as quiet:
        if not verbose:
            print(f"(logs: {path})", file=sys.stdout, flush=True)
        try:
            return asyncio.run(run(cfg, quiet.user_err))
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except (StoreError, WorkerStartError) as exc:  # start-up problems: one line, and where the log is
            print(f"error: {exc}" + ("" if verbose else f" (log: {path})"), file=quiet.user_err)
            return 2
        except Exception as exc:  # anything unexpected: one line here, the traceback in the log
            log.exception("terminal mode failed")
            print(f"error: {exc} (details in {path})", file=quiet.user_err)
            return 1
