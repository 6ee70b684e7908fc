"""Terminal mode: the whole product without Discord (`python -m bot` with no token).

Chat with the assistant (answers stream), flag the last answer, suggest a
correction, review corrections, retrain, roll back and see the status — through
the same `Runtime`, core and admin operations the Discord commands use. The
person at the terminal is the admin. Works on a pipe as well as a TTY, so it can
be scripted (`printf 'hello\\n/status\\n' | python -m bot`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Awaitable, Callable, Optional, TextIO

from model.config import Config

from bot import admin
from bot.context import Turn
from bot.core import FeedbackError, Request
from bot.retrain import RetrainRefused, format_progress, summarize_report
from bot.runtime import BootstrapError, Runtime

log = logging.getLogger(__name__)

LOCAL_USER_ID = 0  # the person at the terminal (an admin)
PROMPT = "you> "
HELP = """\
Type a message to chat. Commands:
  /flag                 mark the last answer as wrong (like a 👎)
  /good                 mark the last answer as good (like a 👍)
  /correct TEXT         suggest the right answer for the last answer
  /corrections [PAGE]   pending corrections
  /approve ID [TEXT]    approve a correction (optionally with edited text)
  /reject ID            reject a correction
  /retrain              train on approved corrections, gate, and hot-swap
  /rollback [VERSION]   go back to the previous (or given) adapter version
  /status               model, live adapter, worker, feedback and last run
  /new                  start a new conversation
  /forget-me            delete everything stored about you
  /help, /quit"""


def local_message_id() -> int:
    """Ids for answers shown in the terminal: negative, so they never clash with Discord's."""
    return -time.time_ns() // 1000


class Terminal:
    """One terminal conversation driving a Runtime."""

    def __init__(self, runtime: Runtime, out: TextIO = sys.stdout):
        self.runtime = runtime
        self.core = runtime.core
        self.out = out
        self.turns: list[Turn] = []
        self.last_answer_id: Optional[int] = None
        self.commands: dict[str, Callable[[list[str], str], Awaitable[None]]] = {
            "/help": self.cmd_help, "/flag": self.cmd_flag, "/good": self.cmd_good,
            "/correct": self.cmd_correct, "/corrections": self.cmd_corrections,
            "/approve": self.cmd_approve, "/reject": self.cmd_reject, "/retrain": self.cmd_retrain,
            "/rollback": self.cmd_rollback, "/status": self.cmd_status, "/new": self.cmd_new,
            "/forget-me": self.cmd_forget_me,
        }

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

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
        except ValueError as exc:
            self.say(f"{exc}. /help shows the usage.")
        return True

    # -------------------------------------------------------------- chat

    async def chat(self, text: str) -> None:
        request = Request(user_id=LOCAL_USER_ID, turns=self.turns + [Turn("user", text, author_id=LOCAL_USER_ID)])
        stream = self.core.answer(request)
        self.say(f"{self.runtime.cfg.identity.name}> ", end="")
        async for delta in stream:
            self.say(delta, end="")
        result = stream.result
        if result.status != "complete":
            self.say(result.display[len(result.text):], end="")
        self.say()
        answer_id = local_message_id()
        await self.core.record(request, result, [answer_id])
        if result.status != "error":
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
        self.say(f"Correction #{correction['id']} saved as {correction['status']}. Approve it with /approve {correction['id']}.")

    async def cmd_forget_me(self, args, rest) -> None:
        report = await self.core.forget_me(LOCAL_USER_ID)
        self.turns, self.last_answer_id = [], None
        self.say(report.message())

    async def cmd_new(self, args, rest) -> None:
        self.turns, self.last_answer_id = [], None
        self.say("New conversation.")

    # ------------------------------------------------------------- admin

    async def cmd_corrections(self, args, rest) -> None:
        page = int(args[0]) - 1 if args else 0
        views, pages = await admin.pending_page(self.core.store, page)
        if not views:
            self.say("No pending corrections.")
            return
        for view in views:
            self.say(view.render().replace("**", ""))
            self.say()
        self.say(f"Page {min(page, pages - 1) + 1}/{pages}. /approve ID or /reject ID.")

    async def cmd_approve(self, args, rest) -> None:
        cid, text = _id_and_text(args, rest)
        view = await admin.review(self.core.store, cid, "approved", LOCAL_USER_ID, text=text)
        self.say(f"Correction #{view.id} approved. /retrain to learn it.")

    async def cmd_reject(self, args, rest) -> None:
        cid, _ = _id_and_text(args, rest)
        view = await admin.review(self.core.store, cid, "rejected", LOCAL_USER_ID)
        self.say(f"Correction #{view.id} rejected.")

    async def cmd_retrain(self, args, rest) -> None:
        async def progress(event: dict) -> None:
            if event.get("event") in ("progress", "phase", "done", "error"):
                self.say(format_progress(event))

        self.say("Retraining on the approved corrections…")
        result = await self.runtime.retrain("manual", LOCAL_USER_ID, progress)
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


def _id_and_text(args: list[str], rest: str) -> tuple[int, Optional[str]]:
    if not args or not args[0].lstrip("#").isdigit():
        raise ValueError("give the correction's number, e.g. /approve 3")
    text = rest.strip()[len(args[0]):].strip()
    return int(args[0].lstrip("#")), (text or None)


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


async def read_lines(prompt: Callable[[], None]):
    """Lines from stdin without blocking the event loop; ends at EOF."""
    loop = asyncio.get_running_loop()
    while True:
        prompt()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        yield line


async def run(cfg: Config) -> int:
    async def say(text: str) -> None:
        print(text, flush=True)

    try:
        runtime = await Runtime.start(cfg, say=say)
    except BootstrapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    terminal = Terminal(runtime)
    try:
        terminal.say(f"{cfg.identity.name} is ready (adapter {runtime.live.version or 'none'}). /help lists commands.")
        interactive = sys.stdin.isatty()
        async for line in read_lines(lambda: terminal.say(PROMPT, end="") if interactive else None):
            if not await terminal.handle(line):
                break
    finally:
        await runtime.close()
    return 0


def main(cfg: Config) -> int:
    """Entry point used by `python -m bot` when no Discord token is set."""
    try:
        return asyncio.run(run(cfg))
    except KeyboardInterrupt:
        return 130
