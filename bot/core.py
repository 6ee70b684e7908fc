"""The bot's runtime, free of Discord: answer conversations, take feedback, forget users.

`Core` owns the config, the store, the model client (and the worker child when
the bot runs its own), the in-flight limit and the per-user rate limit. Which
adapter is live is not its fact: the `Runtime` owns it (`LiveAdapter`, set from
the registry at start and at every swap-in/rollback) and Core reads it through
a callable. Answers request `model.served_name` while an adapter is live, the
base model only when nothing is promoted; nothing on the answer path asks the
server what it serves (vLLM's /health is an empty 200). The Discord front-end (`discord_app.py`) and the terminal front-end
(`local.py`) both drive it with plain data: `Request`s of `Turn`s in, text
deltas and `AnswerResult`s out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Optional, Sequence

from model.client import (
    ModelBadRequest,
    ModelClient,
    ModelError,
    ModelOverloaded,
    ModelUnavailable,
)
from model.config import Config, secret
from trainer.matching import states_fact

from bot.admin import claimed_identities
from bot.context import Turn, build_prompt, context_budget, question_budget
from bot.inflight import InflightLimiter
from bot.memory import Fact, Memory, scope_of
from bot.policy import RateLimiter
from bot.privacy import ForgetReport, forget_everywhere
from bot.store import MAX_CORRECTION_CHARS, AnswerStatus, CorrectionStatus, FlagKind, Store, TooManyPending
from bot.supervisor import WorkerSupervisor

log = logging.getLogger(__name__)

# What users read when something goes wrong (details go to the log).
MSG_UNREACHABLE = "⚠️ The model is not reachable right now. Please try again in a minute."
MSG_RESTARTING = "⚠️ The model is restarting. Please try again in a minute."
MSG_OVERLOADED = "⚠️ The model is busy right now. Please try again in {seconds} seconds."
MSG_BAD_REQUEST = "⚠️ The model could not take this request; the details are in the bot's log."
# A chat user cannot "lower max_tokens": say what they can do instead.
MSG_TOO_LONG = "⚠️ This conversation is too long for me to read. Start a new one and ask again."
MSG_FAILED = "⚠️ Something went wrong while answering; the details are in the bot's log."
CUT_OFF_MARK = "\n\n… ⚠️ answer cut off: the model stopped responding"
MSG_RATE_LIMITED = "You're sending questions faster than I can keep up. Please wait {seconds} s and ask again."
MSG_QUEUED = "⏳ In queue: position {position}"
MSG_RETRAINING = "🛠️ I'm being retrained right now (the GPU is busy learning). Please ask again in a few minutes."


class FeedbackError(ValueError):
    """Feedback the core cannot accept; the message is for the user."""


@dataclass
class Request:
    """A question to answer: the conversation so far (oldest first, question last)."""

    user_id: int
    turns: list[Turn]
    guild_id: Optional[int] = None
    channel_id: Optional[int] = None
    message_id: Optional[int] = None

    @property
    def scope(self) -> str:
        """Whose community memory answers here (bot.memory.scope_of)."""
        return scope_of(self.guild_id, self.channel_id)


@dataclass(frozen=True)
class LiveAdapter:
    """The adapter answers use: its registry version, directory and since when (ISO time).
    `version` None: nothing promoted, answers come from the base model."""

    version: Optional[str] = None
    path: Optional[Path] = None
    since: Optional[str] = None


NO_ADAPTER = LiveAdapter()


@dataclass
class AnswerResult:
    """What happened while answering; `display` is what the user should see at the end."""

    prompt: list[dict]
    text: str = ""
    status: str = AnswerStatus.COMPLETE
    model: Optional[str] = None
    adapter_version: Optional[str] = None
    notice: Optional[str] = None  # user-facing words for an error
    ttft_ms: Optional[float] = None
    total_ms: Optional[float] = None
    facts: list[Fact] = field(default_factory=list)  # memory entries put into the prompt
    sources: list[Fact] = field(default_factory=list)  # ... of those, the ones the answer states
    quoted: list[Fact] = field(default_factory=list)  # a close fact the answer did not state: shown

    @property
    def display(self) -> str:
        if self.status == AnswerStatus.CUT_OFF:
            return self.text + CUT_OFF_MARK
        if self.status == AnswerStatus.ERROR:
            return self.notice or MSG_FAILED
        return self.text


@dataclass
class AnswerStream:
    """Async iterator of text deltas; `result` is complete once iteration ends."""

    result: AnswerResult
    _gen: AsyncIterator[str] = field(repr=False, default=None)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._gen


def _error_notice(exc: ModelError, worker_state: Optional[str]) -> str:
    if isinstance(exc, ModelOverloaded):
        seconds = max(int(round(getattr(exc, "retry_after", None) or 5)), 1)
        return MSG_OVERLOADED.format(seconds=seconds)
    if isinstance(exc, ModelUnavailable):
        return MSG_RESTARTING if worker_state in ("starting", "restarting") else MSG_UNREACHABLE
    if isinstance(exc, ModelBadRequest):  # the server's words are for API callers: log them only
        return MSG_TOO_LONG if "context length" in exc.message.lower() else MSG_BAD_REQUEST
    return MSG_FAILED


class Core:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        client: ModelClient,
        supervisor: Optional[WorkerSupervisor] = None,
        max_in_flight: Optional[int] = None,
        live: Callable[[], LiveAdapter] = lambda: NO_ADAPTER,
    ):
        self.cfg = cfg
        self.store = store
        self.client = client
        self.supervisor = supervisor
        self.limiter = InflightLimiter(max_in_flight or cfg.discord.max_in_flight or cfg.worker.max_batch_size)
        self.rate_limiter = RateLimiter(cfg.discord.user_rate_limit, cfg.discord.user_rate_window_s)
        self.live = live  # the Runtime's live adapter (the one owner of that fact)
        # Called when the server says the served alias does not exist (an external server
        # restarted without it): the Runtime loads the live adapter again.
        self.on_adapter_missing: Callable[[], None] = lambda: None
        self._base_id: Optional[str] = None  # the server's base model id, asked once
        # Set while the worker sleeps for a retrain (gpu_policy: pause): users get this at once.
        self.paused_notice: Optional[str] = None
        self.max_context: Optional[int] = None  # the model's context in tokens, when the server says
        self.memory = Memory(cfg, store)  # started by the Runtime (loading its model takes seconds)

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def create(cls, cfg: Config, worker_port: Optional[int] = None,
                     adapters: Optional[Callable[[], dict[str, str]]] = None) -> "Core":
        """Open the store and reach the model: `model.url`, or a worker child we start.

        `adapters` (name -> path) are loaded by the worker child at each (re)start."""
        store = await Store.open(cfg.path(cfg.store.path))
        supervisor = None
        try:
            if cfg.model.url:
                base_url, api_key = cfg.model.url, secret(cfg.model.api_key_env)
            else:
                supervisor = WorkerSupervisor(cfg, port=worker_port, adapters=adapters)
                await supervisor.start()
                base_url, api_key = supervisor.base_url, supervisor.api_key  # a per-run key if none set
            client = ModelClient(base_url, api_key=api_key, timeout=cfg.model.request_timeout_s)
        except BaseException:
            if supervisor is not None:
                await supervisor.stop()
            await store.close()
            raise
        core = cls(cfg, store, client, supervisor)
        await core.learn_max_context()
        return core

    async def close(self) -> None:
        await self.client.aclose()
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.store.close()

    # ------------------------------------------------------------ answering

    def check_rate(self, user_id: int) -> Optional[str]:
        """None if the user may ask now, else the polite message to show them."""
        wait = self.rate_limiter.check(user_id)
        return MSG_RATE_LIMITED.format(seconds=max(int(wait + 0.999), 1)) if wait else None

    async def learn_max_context(self) -> None:
        """The model's context size: our worker's /health `max_context`, or vLLM's
        `max_model_len` in /v1/models. Unknown (None) keeps the configured budget."""
        try:
            health = await self.client.health()
            models = [] if health.get("max_context") else await self.client.models()
        except ModelError as exc:
            log.warning("could not learn the model's context size: %s", exc.message)
            return
        sizes = [health.get("max_context")] + [m.get("max_model_len") for m in models]
        self.max_context = next((int(n) for n in sizes if isinstance(n, int) and n > 0), None)

    def context_budget(self) -> int:
        return context_budget(self.cfg.discord.context_token_budget, self.max_context, self.cfg.model.max_tokens)

    def question_budget(self) -> int:
        """Tokens a new question may take; front-ends trim longer ones with a notice (fit_question)."""
        return question_budget(self.cfg.identity.system, self.context_budget())

    def prompt_for(self, turns: list[Turn], facts: Sequence[Fact] = ()) -> list[dict]:
        return build_prompt(self.cfg.identity.system, turns, facts=[(f.question, f.answer) for f in facts],
                            token_budget=self.context_budget(), max_messages=self.cfg.discord.max_history_messages)

    async def model_for_answer(self) -> tuple[str, Optional[str]]:
        """(the request's `model`, the adapter version behind it): the served alias while an
        adapter is live, else the base model's id (asked of the server once, then kept)."""
        live = self.live()
        if live.version:
            return self.cfg.model.served_name, live.version
        if self._base_id is None:
            self._base_id = await self.client.base_model_id()
        return self._base_id, None

    def answer(
        self,
        request: Request,
        on_queue: Optional[Callable[[int], Awaitable[None]]] = None,
    ) -> AnswerStream:
        """Stream an answer to `request`. Errors end the stream; `result` says how it ended.
        The prompt is complete once iteration starts (the memory is asked first)."""
        result = AnswerResult(prompt=self.prompt_for(request.turns))
        return AnswerStream(result, self._generate(request, result, on_queue))

    async def _recall(self, request: Request, result: AnswerResult) -> None:
        """The community's facts for this question into the prompt (none: the prompt stays)."""
        question = next((t.content for t in reversed(request.turns) if t.role == "user"), "")
        try:
            result.facts = await self.memory.recall(request.scope, question)
        except Exception:  # the memory must never cost an answer
            log.exception("recalling facts failed; answering without them")
            result.facts = []
        if result.facts:
            result.prompt = self.prompt_for(request.turns, result.facts)

    async def _generate(self, request: Request, result: AnswerResult, on_queue) -> AsyncIterator[str]:
        start = time.perf_counter()
        if self.paused_notice:
            result.status, result.notice, result.total_ms = AnswerStatus.ERROR, self.paused_notice, 0.0
            return
        await self._recall(request, result)
        try:
            async with self.limiter.slot(on_queue):
                start = time.perf_counter()  # time the model, not the queue
                result.model, result.adapter_version = await self.model_for_answer()
                m = self.cfg.model
                async for delta in self.client.stream_chat(
                    result.prompt, model=result.model, max_tokens=m.max_tokens,
                    temperature=m.temperature, top_p=m.top_p,
                ):
                    if not delta:
                        continue
                    if result.ttft_ms is None:
                        result.ttft_ms = (time.perf_counter() - start) * 1000
                    result.text += delta
                    yield delta
        except ModelError as exc:
            self._fail(result, exc, _error_notice(exc, self.worker_state))
        except Exception as exc:  # a bug or a protocol surprise: keep what we have, tell the user
            self._fail(result, exc, MSG_FAILED)
        finally:
            result.total_ms = (time.perf_counter() - start) * 1000
        if result.facts:
            result.sources = [f for f in result.facts if states_fact(result.text, f.answer, f.question)]
            closest = result.facts[0]
            if result.status == AnswerStatus.COMPLETE and closest not in result.sources:
                # a small model may not use what it was given, or use a less close fact than the one
                # asked about: show the closest, with its source
                result.quoted = [closest]

    def _fail(self, result: AnswerResult, exc: BaseException, notice: str) -> None:
        log.error("answer failed after %d chars (model %s): %r", len(result.text), result.model, exc)
        if result.adapter_version is None and isinstance(exc, ModelError):
            self._base_id = None  # ask again next time: the server may have restarted with another id
        elif isinstance(exc, ModelBadRequest) and exc.status == 404:
            self.on_adapter_missing()
        result.notice = notice
        result.status = AnswerStatus.CUT_OFF if result.text.strip() else AnswerStatus.ERROR

    @property
    def worker_state(self) -> Optional[str]:
        return self.supervisor.state if self.supervisor is not None else None

    async def record(self, request: Request, result: AnswerResult, message_ids: list[int]) -> int:
        """Log a posted answer with its exact prompt; returns the exchange id."""
        return await self.store.log_exchange(
            user_id=request.user_id, guild_id=request.guild_id, channel_id=request.channel_id,
            request_message_id=request.message_id, answer_message_ids=message_ids,
            prompt_messages=result.prompt, answer=result.text, status=result.status,
            model=result.model, adapter_version=result.adapter_version,
            ttft_ms=result.ttft_ms, total_ms=result.total_ms,
        )

    # ------------------------------------------------------------- feedback

    def reaction_kind(self, emoji: str) -> Optional[str]:
        d = self.cfg.discord
        if emoji in d.flag_reactions:
            return FlagKind.BAD
        if emoji in d.good_reactions:
            return FlagKind.GOOD
        return None

    async def react(self, message_id: int, user_id: int, emoji: str) -> Optional[str]:
        """Record a 👎/👍 on an answer message; returns the kind, None if not ours or not feedback."""
        kind = self.reaction_kind(emoji)
        if kind is None:
            return None
        exchange = await self.store.exchange_by_message(message_id)
        if exchange is None:
            return None
        await self.store.add_flag(exchange["id"], user_id, kind, emoji)
        return kind

    async def unreact(self, message_id: int, user_id: int, emoji: str) -> bool:
        if self.reaction_kind(emoji) is None:
            return False
        exchange = await self.store.exchange_by_message(message_id)
        if exchange is None:
            return False
        return await self.store.remove_flag(exchange["id"], user_id, emoji)

    async def is_answer(self, message_id: int) -> bool:
        return await self.store.exchange_by_message(message_id) is not None

    async def suggest_correction(
        self, message_id: int, user_id: int, text: str, *, trusted: bool = False
    ) -> dict:
        """Store a correction of the answer in `message_id`; trusted users' are approved at once,
        unless the text claims another identity (then an admin reviews it, warned). The row
        returned carries `claims`: the other identities it claims, if any."""
        text = text.strip()
        if not text:
            raise FeedbackError("The correction is empty: write the answer I should have given.")
        if len(text) > MAX_CORRECTION_CHARS:
            raise FeedbackError(f"The correction is {len(text):,} characters long; a correction may have at most "
                                f"{MAX_CORRECTION_CHARS:,}. Write the right answer in a few sentences.")
        exchange = await self.store.exchange_by_message(message_id)
        if exchange is None:
            raise FeedbackError("That message isn't one of my answers, so there is nothing to correct.")
        claims = claimed_identities(self.cfg, text)
        try:
            if trusted and not claims:
                cid = await self.store.add_correction(exchange["id"], user_id, text, status=CorrectionStatus.APPROVED,
                                                      reviewer_id=user_id, reason="auto: trusted role")
            else:
                cid = await self.store.add_correction(exchange["id"], user_id, text,
                                                      max_pending=self.cfg.discord.max_pending_corrections)
        except TooManyPending as exc:
            raise FeedbackError(str(exc)) from None
        row = await self.store.get_correction(cid)
        if row["status"] == CorrectionStatus.APPROVED:
            await self.memory.sync()
        return {**row, "claims": claims}

    async def forget_me(self, user_id: int) -> ForgetReport:
        """The store, run exports and registry records lose the user's text (bot.privacy)."""
        return await forget_everywhere(self.cfg, self.store, user_id)
