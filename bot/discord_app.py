"""The Discord front-end: discord.py client, slash commands, and the streaming reply.

Handlers read as the story they tell — receive, decide, build context, stream,
log — and hand everything that is not Discord to `Core`. A streamed answer is
posted at once as a placeholder, then edited at most once per
`discord.edit_interval_s` as tokens arrive, split into several messages when it
outgrows one (render.py), and logged with every message id it ended up in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Callable, Optional, Sequence

import discord
import discord.gateway
import discord.http
import yarl
from discord import app_commands

from bot.admin import memory_footer
from bot.context import Turn, fit_question, strip_mention
from bot.core import MSG_QUEUED, Core, FeedbackError, Request
from bot.discord_admin import mention
from bot.policy import MessageFacts, is_allowed, is_trusted, should_respond
from bot.render import split_message, streaming_view
from bot.store import CorrectionStatus, StoreError

log = logging.getLogger(__name__)

PLACEHOLDER = "⏳"
TYPING_REFRESH_S = 8.0  # Discord shows "typing…" for ~10 s per trigger
# The placeholder already says "working on it"; typing… is for a model slow to start, and
# skipping it when the first token is quick saves a REST call per answer.
TYPING_AFTER_S = 0.5
CORRECTION_ACK_EMOJI = "✅"
CORRECTION_INPUT_ID = "correction"  # custom_id of the modal's text field
CORRECTION_MAX_CHARS = 4000  # Discord's limit for a text input
MSG_NOT_ALLOWED = "Sorry, I'm not allowed to answer you here."
MSG_EMPTY_QUESTION = "Hi! Ask me something after the mention."
MSG_CORRECTION_USAGE = "Write the correct answer after `{prefix}`, in a reply to my answer."
MSG_CORRECTION_PENDING = "Thanks! Your correction (#{id}) is saved and waits for review."
MSG_CORRECTION_APPROVED = "Thanks! Your correction (#{id}) is approved and will be used in the next training run."
MSG_NOT_SAVED = "⚠️ I could not save that right now (the bot's storage is full); please try again later."
MSG_CORRECTION_CLAIMS = (" Note: it says I am someone else ({claims}), so an admin will look at it before"
                         " I learn anything from it.")


def correction_reply(text: str, claims: Sequence[str]) -> str:
    """The thanks for a correction, with the identity-claim note when it has one."""
    return text + (MSG_CORRECTION_CLAIMS.format(claims=", ".join(claims)) if claims else "")

CommandSetup = Callable[[app_commands.CommandTree, "LoopcordBot"], None]


def point_discord_py_at(api_base: Optional[str], gateway_url: Optional[str]) -> None:
    """Use a Discord-compatible server (Spacebar, a test fake) instead of discord.com."""
    if api_base:
        discord.http.Route.BASE = api_base.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


def role_ids_of(user: discord.abc.User) -> list[int]:
    return [r.id for r in getattr(user, "roles", [])]


# ---------------------------------------------------------------- answer targets


class ReplyTarget:
    """An answer posted as a reply to a message, continued in the same channel."""

    def __init__(self, message: discord.Message):
        self.message = message
        self.channel = message.channel

    async def post_first(self, content: str) -> discord.Message:
        return await self.message.reply(content, mention_author=False)

    async def post_more(self, content: str) -> discord.Message:
        return await self.channel.send(content)


class InteractionTarget:
    """An answer to a deferred slash command: the original response, then followups."""

    def __init__(self, interaction: discord.Interaction):
        self.interaction = interaction
        self.channel = None  # the deferred response already shows "thinking…"

    async def post_first(self, content: str) -> discord.Message:
        return await self.interaction.edit_original_response(content=content)

    async def post_more(self, content: str) -> discord.Message:
        return await self.interaction.followup.send(content, wait=True)


class StreamedReply:
    """The Discord messages of one answer, kept in sync with a list of contents."""

    def __init__(self, target):
        self.target = target
        self.messages: list[discord.Message] = []
        self.shown: list[str] = []
        self._lock = asyncio.Lock()  # queue-position updates and the flusher never interleave

    @property
    def message_ids(self) -> list[int]:
        return [m.id for m in self.messages]

    async def show(self, contents: Sequence[str]) -> None:
        async with self._lock:
            for i, content in enumerate(contents):
                if i < len(self.messages):
                    if self.shown[i] != content:
                        await self.messages[i].edit(content=content)
                        self.shown[i] = content
                else:
                    post = self.target.post_first if not self.messages else self.target.post_more
                    self.messages.append(await post(content))
                    self.shown.append(content)
            for extra in self.messages[len(contents):]:  # an answer never shrinks; be safe anyway
                await extra.delete()
            del self.messages[len(contents):], self.shown[len(contents):]


async def keep_typing(channel, until: asyncio.Event, after: float = TYPING_AFTER_S) -> None:
    """Show "typing…" in `channel` from `after` seconds on until the first token arrives."""
    if channel is None:
        return
    try:
        await asyncio.wait_for(until.wait(), after)
        return  # the answer started before anyone would notice a wait
    except asyncio.TimeoutError:
        pass
    try:
        while not until.is_set():
            await channel.typing()
            try:
                await asyncio.wait_for(until.wait(), TYPING_REFRESH_S)
            except asyncio.TimeoutError:
                pass
    except (discord.HTTPException, AttributeError) as exc:
        log.debug("typing indicator failed: %r", exc)


# ---------------------------------------------------------------- the modal


class CorrectionModal(discord.ui.Modal, title="Suggest a correction"):
    correction = discord.ui.TextInput(
        label="What should the answer have been?",
        style=discord.TextStyle.paragraph,
        custom_id=CORRECTION_INPUT_ID,
        max_length=CORRECTION_MAX_CHARS,
        required=True,
    )

    def __init__(self, bot: "LoopcordBot", message_id: int):
        super().__init__()
        self.bot, self.message_id = bot, message_id

    async def on_submit(self, interaction: discord.Interaction) -> None:
        _, reply, _ = await self.bot.take_correction(interaction.user, self.message_id, self.correction.value,
                                                     channel_id=interaction.channel_id)
        await interaction.response.send_message(reply, ephemeral=True)


# ---------------------------------------------------------------- the client


class LoopcordBot(discord.Client):
    def __init__(self, core: Core, command_setups: Sequence[CommandSetup] = ()):
        d = core.cfg.discord
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the developer portal
        super().__init__(
            intents=intents,
            guild_ready_timeout=d.guild_ready_timeout,
            # Model output must never ping @everyone or roles; replies do not ping either.
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=False,
                                                     replied_user=False),
        )
        point_discord_py_at(d.api_base, d.gateway_url)
        self.core = core
        self.cfg = core.cfg
        self.tree = app_commands.CommandTree(self)
        self._command_setups = list(command_setups)
        self._threads: set[int] = set()  # threads the bot was mentioned in
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ start-up

    async def setup_hook(self) -> None:
        self.add_chat_commands()
        for setup in self._command_setups:
            setup(self.tree, self)
        await self.tree.sync()

    def add_chat_commands(self) -> None:
        @self.tree.command(name="ask", description="Ask the assistant a question")
        @app_commands.describe(question="Your question")
        async def ask(interaction: discord.Interaction, question: str) -> None:
            await self.on_ask(interaction, question)

        @self.tree.command(name="forget-me", description="Delete everything stored about you")
        async def forget_me(interaction: discord.Interaction) -> None:
            await self.on_forget_me(interaction)

        @self.tree.context_menu(name="Suggest correction")
        async def suggest_correction(interaction: discord.Interaction, message: discord.Message) -> None:
            await self.on_suggest_correction(interaction, message)

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s (%s)", self.user, self.user.id if self.user else "?")

    # ------------------------------------------------------------ messages

    async def on_message(self, message: discord.Message) -> None:
        if await self.is_correction_reply(message):
            return await self.on_correction_reply(message)
        facts = await self.facts_of(message)
        if not should_respond(facts, self.cfg.discord):
            return
        if facts.in_thread and facts.mentions_bot:
            self._threads.add(message.channel.id)
        if notice := self.core.check_rate(message.author.id):
            return await self.send_notice(message, notice)
        turns = await self.conversation_of(message)
        if not turns or not turns[-1].content:
            return await self.send_notice(message, MSG_EMPTY_QUESTION)
        turns[-1], notice = self.fit_question(turns[-1])
        if notice:
            await self.send_notice(message, notice)
        request = Request(message.author.id, turns, guild_id=message.guild.id if message.guild else None,
                          channel_id=message.channel.id, message_id=message.id)
        await self.answer(ReplyTarget(message), request)

    async def facts_of(self, message: discord.Message) -> MessageFacts:
        channel = message.channel
        in_thread = isinstance(channel, discord.Thread)
        facts = MessageFacts(
            author_id=message.author.id,
            author_is_bot=message.author.bot,
            is_self=self.user is not None and message.author.id == self.user.id,
            channel_id=channel.id,
            parent_channel_id=getattr(channel, "parent_id", None) if in_thread else None,
            guild_id=message.guild.id if message.guild else None,
            role_ids=role_ids_of(message.author),
            mentions_bot=self.user is not None and any(u.id == self.user.id for u in message.mentions),
            replies_to_bot=self.replies_to_me(message),
            is_dm=message.guild is None,
            in_thread=in_thread,
        )
        if in_thread and not facts.is_self and not facts.author_is_bot:
            facts.bot_in_thread = await self.bot_is_in_thread(channel)
        return facts

    def replies_to_me(self, message: discord.Message) -> bool:
        ref = message.reference
        parent = ref.resolved if ref is not None else None
        return isinstance(parent, discord.Message) and self.user is not None and parent.author.id == self.user.id

    async def bot_is_in_thread(self, thread: discord.Thread) -> bool:
        """Threads it created, was mentioned in, or answered in before (store survives restarts)."""
        if thread.owner_id == self.user.id or thread.id in self._threads:
            return True
        if await self.core.store.has_exchanges_in_channel(thread.id):
            self._threads.add(thread.id)
            return True
        return False

    async def send_notice(self, message: discord.Message, text: str) -> None:
        try:
            await message.reply(text, mention_author=False)
        except discord.HTTPException as exc:
            log.warning("could not send notice in %s: %r", message.channel.id, exc)

    # ------------------------------------------------------------ context

    async def conversation_of(self, message: discord.Message) -> list[Turn]:
        """The turns leading to `message`: its reply chain, else the thread it is in."""
        if message.reference is None and isinstance(message.channel, discord.Thread):
            history = [m async for m in message.channel.history(
                limit=self.cfg.discord.max_history_messages, before=message)]
            return await self.turns_of(list(reversed(history)) + [message])
        return await self.turns_of(await self.reply_chain(message))

    async def reply_chain(self, message: discord.Message) -> list[discord.Message]:
        """`message` and the messages it replies to, oldest first; stops at one of our answers."""
        chain = [message]
        while len(chain) < self.cfg.discord.max_history_messages:
            current = chain[-1]
            if current is not message and current.author.id == self.user.id:
                break  # our answer: its stored prompt already holds everything before it
            parent = await self.referenced(current)
            if parent is None:
                break
            chain.append(parent)
        return list(reversed(chain))

    async def referenced(self, message: discord.Message) -> Optional[discord.Message]:
        ref = message.reference
        if ref is None or ref.message_id is None:
            return None
        if isinstance(ref.resolved, discord.Message):
            return ref.resolved
        if ref.cached_message is not None:
            return ref.cached_message
        channel = message.channel if ref.channel_id == message.channel.id else self.get_channel(ref.channel_id)
        try:
            return await channel.fetch_message(ref.message_id)
        except (discord.HTTPException, AttributeError) as exc:
            log.debug("reply chain stops at %s: %r", ref.message_id, exc)
            return None

    async def turns_of(self, messages: list[discord.Message]) -> list[Turn]:
        """Map messages to user/assistant turns. Our answers come from the store, whole."""
        turns: list[Turn] = []
        seen_exchanges: set[int] = set()
        for m in messages:
            if m.author.id != self.user.id:
                turns.append(Turn("user", strip_mention(m.content, self.user.id), m.id, m.author.id))
                continue
            exchange = await self.core.store.exchange_by_message(m.id)
            if exchange is None or exchange["id"] in seen_exchanges:
                continue
            seen_exchanges.add(exchange["id"])
            if not turns:  # the oldest answer in view: bring back the conversation it answered
                turns += [Turn(p["role"], p["content"]) for p in exchange["prompt_messages"]
                          if p["role"] in ("user", "assistant")]
            turns.append(Turn("assistant", exchange["answer"], m.id, m.author.id))
        return turns

    # ------------------------------------------------------------ streaming

    async def answer(self, target, request: Request) -> Optional[int]:
        """Post a placeholder, stream the answer into it, log it. Returns the exchange id."""
        reply = StreamedReply(target)
        # The placeholder goes out while the model starts on the request: one Discord round
        # trip less before the first words show. Every other show waits for it.
        posted = asyncio.create_task(reply.show([PLACEHOLDER]))

        async def show_queue_position(position: int) -> None:
            await asyncio.wait([posted])
            if reply.messages:
                await reply.show([MSG_QUEUED.format(position=position)])

        stream = self.core.answer(request, on_queue=show_queue_position)
        first_token = asyncio.Event()
        typing = asyncio.create_task(keep_typing(target.channel, first_token))
        try:
            await self.stream_into(reply, stream, first_token, posted)
        except discord.HTTPException as exc:
            if not reply.messages:
                log.error("cannot post in channel %s: %r", request.channel_id, exc)
                return None
            log.error("posting the answer failed in channel %s: %r", request.channel_id, exc)
        finally:
            first_token.set()
            typing.cancel()
            posted.cancel()  # a no-op once it is done; stops it if we are cancelled first
        if not reply.messages:
            return None
        return await self.core.record(request, stream.result, reply.message_ids)

    async def stream_into(self, reply: StreamedReply, stream, first_token: asyncio.Event,
                          posted: Optional[asyncio.Task] = None) -> None:
        """Consume deltas while a flusher edits Discord at most once per interval.

        `posted` is the placeholder on its way; if it cannot be posted, the model request
        is dropped at once and the placeholder's error is raised.
        """
        result = stream.result
        changed = asyncio.Event()
        edits: list[asyncio.Task] = []

        async def consume() -> None:
            async for _ in stream:
                first_token.set()
                changed.set()

        async def flush_periodically() -> None:
            if posted is not None:
                await asyncio.shield(posted)  # cancelling the flusher must not cancel the post
            while True:
                await changed.wait()
                changed.clear()
                # Shielded: stopping the flusher must not cut an edit off mid-request (that
                # wastes the call and may or may not change the message).
                edits.append(asyncio.ensure_future(reply.show(streaming_view(result.text))))
                await asyncio.shield(edits[-1])
                await asyncio.sleep(self.cfg.discord.edit_interval_s)

        consumer = asyncio.create_task(consume())
        flusher = asyncio.create_task(flush_periodically())
        try:
            if posted is not None:
                await asyncio.wait([consumer, posted], return_when=asyncio.FIRST_COMPLETED)
                if posted.done() and not posted.cancelled() and posted.exception() is not None:
                    raise posted.exception()
            await consumer
        finally:
            consumer.cancel()
            flusher.cancel()
            await asyncio.gather(consumer, flusher, *edits, return_exceptions=True)
        for task in (flusher, *edits):
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # an edit failed: Discord shows less than the answer
        if posted is not None:
            await posted
        footer = memory_footer(result.sources, result.quoted, mention)
        await reply.show(split_message(result.display + (f"\n-# {footer}" if footer else "")))

    # ------------------------------------------------------------ slash commands

    async def on_ask(self, interaction: discord.Interaction, question: str) -> None:
        facts = self.interaction_facts(interaction)
        if not is_allowed(facts, self.cfg.discord):
            return await interaction.response.send_message(MSG_NOT_ALLOWED, ephemeral=True)
        if notice := self.core.check_rate(interaction.user.id):
            return await interaction.response.send_message(notice, ephemeral=True)
        await interaction.response.defer(thinking=True)
        turn, notice = self.fit_question(Turn("user", question.strip()))
        request = Request(interaction.user.id, [turn], guild_id=interaction.guild_id,
                          channel_id=interaction.channel_id)
        await self.answer(InteractionTarget(interaction), request)
        if notice:
            await interaction.followup.send(notice, ephemeral=True)

    def fit_question(self, turn: Turn) -> tuple[Turn, Optional[str]]:
        """The question trimmed to what the model can read, and the notice saying so (or None)."""
        fitted = fit_question(turn.content, self.core.question_budget())
        return dataclasses.replace(turn, content=fitted.text), fitted.notice

    async def on_forget_me(self, interaction: discord.Interaction) -> None:
        report = await self.core.forget_me(interaction.user.id)
        await interaction.response.send_message(report.message(), ephemeral=True)

    def interaction_facts(self, interaction: discord.Interaction) -> MessageFacts:
        channel = interaction.channel
        in_thread = isinstance(channel, discord.Thread)
        return MessageFacts(
            author_id=interaction.user.id,
            author_is_bot=interaction.user.bot,
            channel_id=interaction.channel_id or 0,
            parent_channel_id=getattr(channel, "parent_id", None) if in_thread else None,
            guild_id=interaction.guild_id,
            role_ids=role_ids_of(interaction.user),
            is_dm=interaction.guild_id is None,
            in_thread=in_thread,
        )

    # ------------------------------------------------------------ feedback

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        if self.is_own_or_bot(payload):
            return
        kind = await self.core.react(payload.message_id, payload.user_id, str(payload.emoji))
        if kind:
            log.info("%s mark by %s on message %s", kind, payload.user_id, payload.message_id)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        if self.is_own_or_bot(payload):
            return
        await self.core.unreact(payload.message_id, payload.user_id, str(payload.emoji))

    def is_own_or_bot(self, payload: discord.RawReactionActionEvent) -> bool:
        member = payload.member
        return payload.user_id == self.user.id or (member is not None and member.bot)

    async def on_suggest_correction(self, interaction: discord.Interaction, message: discord.Message) -> None:
        if not await self.core.is_answer(message.id):
            return await interaction.response.send_message(
                "That message isn't one of my answers, so there is nothing to correct.", ephemeral=True)
        await interaction.response.send_modal(CorrectionModal(self, message.id))

    async def is_correction_reply(self, message: discord.Message) -> bool:
        prefix = self.cfg.discord.correction_prefix
        return bool(
            prefix and message.reference is not None and message.reference.message_id is not None
            and not message.author.bot and message.content.strip().startswith(prefix)
            and await self.core.is_answer(message.reference.message_id)
        )

    async def on_correction_reply(self, message: discord.Message) -> None:
        text = message.content.strip()[len(self.cfg.discord.correction_prefix):]
        stored, reply, flagged = await self.take_correction(message.author, message.reference.message_id, text,
                                                            channel_id=message.channel.id)
        if stored:
            await message.add_reaction(CORRECTION_ACK_EMOJI)
        if not stored or flagged:  # a flagged one is saved, but the author should know why it waits
            await self.send_notice(message, reply)

    async def take_correction(self, user: discord.abc.User, message_id: int, text: str,
                              channel_id: Optional[int] = None) -> tuple[bool, str, bool]:
        """Store a correction; returns (stored, what to tell the user, flagged for an identity claim)."""
        roles = role_ids_of(user)
        facts = MessageFacts(author_id=user.id, role_ids=roles, channel_id=channel_id or 0,
                             is_dm=channel_id is None)
        if not is_allowed(facts, self.cfg.discord):
            return False, MSG_NOT_ALLOWED, False
        if not text.strip():
            return False, MSG_CORRECTION_USAGE.format(prefix=self.cfg.discord.correction_prefix), False
        trusted = is_trusted(roles, user.id, self.cfg.discord)
        try:
            correction = await self.core.suggest_correction(message_id, user.id, text, trusted=trusted)
        except FeedbackError as exc:
            return False, str(exc), False
        except StoreError as exc:  # a full disk: nothing was saved, and the user should know
            log.error("could not store a correction: %s", exc)
            return False, MSG_NOT_SAVED, False
        template = MSG_CORRECTION_APPROVED if correction["status"] == CorrectionStatus.APPROVED else MSG_CORRECTION_PENDING
        return True, correction_reply(template.format(id=correction["id"]), correction["claims"]), bool(correction["claims"])


async def run_discord(cfg, token: str, command_setups: Sequence[CommandSetup] = ()) -> None:
    """Start the runtime (store, model, retrainer), connect to Discord, run until cancelled."""
    from bot.discord_admin import admin_commands, start_schedule
    from bot.runtime import Runtime

    runtime = await Runtime.start(cfg)
    bot = LoopcordBot(runtime.core, [*command_setups, admin_commands(runtime)])
    schedule = start_schedule(bot, runtime)
    try:
        async with bot:
            await bot.start(token)
    finally:
        if schedule is not None:
            schedule.cancel()
        await runtime.close()
