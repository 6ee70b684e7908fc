"""Admin slash commands: /corrections, /reopen, /retrain, /rollback, /status.

Admin = Discord's administrator permission, or a user/role listed in config,
checked here when the command (or a button) runs — not only hidden by
Discord's default permissions. Everyone else gets a polite refusal and nothing
happens. The work itself is done by `Runtime` and `bot.admin`, the same calls
the terminal mode makes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import discord
from discord import app_commands

from trainer.protocol import EventKind

from bot import admin
from bot.memory import fact_of, scope_of
from bot.retrain import RetrainRefused, RetrainResult, format_progress, summarize_report
from bot.runtime import Runtime
from bot.store import CorrectionStatus, RunStatus, RunTrigger

log = logging.getLogger(__name__)

MSG_NOT_ADMIN = "Sorry, only admins can do that."
REVIEW_TIMEOUT_S = 900.0  # review buttons stop working after this; run /corrections again
EMBED_FIELD_CHARS = 400  # per field; 4 embeds x 3 fields stay under Discord's 6000-char total
RESULT_COLORS = {RunStatus.SUCCEEDED: 0x2ECC71, RunStatus.REJECTED: 0xE67E22}


def is_admin_user(runtime: Runtime, user: discord.abc.User) -> bool:
    perms = getattr(user, "guild_permissions", None)
    roles = [r.id for r in getattr(user, "roles", [])]
    return admin.is_admin(runtime.cfg, user.id, roles, bool(perms and perms.administrator))


async def refuse_unless_admin(runtime: Runtime, interaction: discord.Interaction) -> bool:
    """True (after answering politely) when the user is not an admin."""
    if is_admin_user(runtime, interaction.user):
        return False
    log.info("refused admin action by %s (%s)", interaction.user, interaction.user.id)
    await interaction.response.send_message(MSG_NOT_ADMIN, ephemeral=True)
    return True


# ------------------------------------------------------------------ /corrections


def corrections_embeds(views: list[admin.CorrectionView]) -> list[discord.Embed]:
    embeds = []
    for v in views:
        about = f"from <@{v.user_id}>" + (f"\n⚠️ claims another identity: {', '.join(v.claims)}" if v.claims else "")
        e = discord.Embed(title=f"Correction #{v.id}", description=about)
        question = "(deleted by the person who asked it)" if v.question_forgotten else v.question
        e.add_field(name="Question", value=admin.preview(question, EMBED_FIELD_CHARS) or "-", inline=False)
        e.add_field(name="Bot said", value=admin.preview(v.bad_answer, EMBED_FIELD_CHARS) or "-", inline=False)
        e.add_field(name="Proposed", value=admin.preview(v.proposed, EMBED_FIELD_CHARS) or "-", inline=False)
        embeds.append(e)
    return embeds


class EditCorrectionModal(discord.ui.Modal, title="Edit and approve"):
    text = discord.ui.TextInput(label="Corrected answer", style=discord.TextStyle.paragraph, max_length=4000)

    def __init__(self, review: "ReviewView", correction: admin.CorrectionView):
        super().__init__()
        self.review, self.correction = review, correction
        self.text.default = correction.proposed[:4000]

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.review.decide(interaction, self.correction.id, CorrectionStatus.APPROVED, text=str(self.text.value))


class ReviewView(discord.ui.View):
    """One page of pending corrections with Approve / Reject / Edit per correction."""

    def __init__(self, runtime: Runtime, page: int = 0):
        super().__init__(timeout=REVIEW_TIMEOUT_S)
        self.runtime, self.page, self.pages = runtime, page, 1
        self.views: list[admin.CorrectionView] = []

    async def load(self) -> tuple[str, list[discord.Embed]]:
        self.views, self.pages = await admin.pending_page(self.runtime.core.store, self.page, self.runtime.cfg)
        self.page = min(self.page, self.pages - 1)
        self.clear_items()
        for row, v in enumerate(self.views):
            self._button(f"Approve #{v.id}", discord.ButtonStyle.success, row, self._on_decide(v, CorrectionStatus.APPROVED))
            self._button(f"Reject #{v.id}", discord.ButtonStyle.danger, row, self._on_decide(v, CorrectionStatus.REJECTED))
            self._button(f"Edit #{v.id}", discord.ButtonStyle.secondary, row, self._on_edit(v))
        if self.pages > 1:
            last = min(len(self.views), admin.CORRECTIONS_PAGE_SIZE)
            self._button("◀ Prev", discord.ButtonStyle.secondary, last, self._on_page(-1), disabled=self.page == 0)
            self._button("Next ▶", discord.ButtonStyle.secondary, last, self._on_page(+1),
                         disabled=self.page >= self.pages - 1)
        if not self.views:
            return "No pending corrections. 🎉", []
        return f"Pending corrections, page {self.page + 1}/{self.pages}:", corrections_embeds(self.views)

    def _button(self, label, style, row, callback, disabled=False) -> None:
        button = discord.ui.Button(label=label, style=style, row=row, disabled=disabled)
        button.callback = callback
        self.add_item(button)

    def _on_decide(self, view: admin.CorrectionView, decision: str):
        async def callback(interaction: discord.Interaction) -> None:
            await self.decide(interaction, view.id, decision)
        return callback

    def _on_edit(self, view: admin.CorrectionView):
        async def callback(interaction: discord.Interaction) -> None:
            if not await refuse_unless_admin(self.runtime, interaction):
                await interaction.response.send_modal(EditCorrectionModal(self, view))
        return callback

    def _on_page(self, step: int):
        async def callback(interaction: discord.Interaction) -> None:
            if await refuse_unless_admin(self.runtime, interaction):
                return
            self.page = max(0, self.page + step)
            await self.refresh(interaction)
        return callback

    async def decide(self, interaction: discord.Interaction, correction_id: int, decision: str,
                     text: Optional[str] = None) -> None:
        if await refuse_unless_admin(self.runtime, interaction):
            return
        try:
            view = await admin.review(self.runtime.core.store, correction_id, decision, interaction.user.id,
                                      text=text, cfg=self.runtime.cfg, memory=self.runtime.core.memory)
        except admin.AdminError as exc:
            await interaction.response.send_message(str(exc), ephemeral=True)
            return
        warning = f" {view.warning}" if view.warning and decision == CorrectionStatus.APPROVED else ""
        await self.refresh(interaction, note=f"#{correction_id} {decision}.{warning}")

    async def refresh(self, interaction: discord.Interaction, note: str = "") -> None:
        content, embeds = await self.load()
        content = f"{note} {content}".strip()
        if interaction.message is not None:
            await interaction.response.edit_message(content=content, embeds=embeds, view=self)
        else:  # from a modal opened on an ephemeral message
            await interaction.response.send_message(content, embeds=embeds, view=self, ephemeral=True)


# --------------------------------------------------------------------- /retrain


class ProgressMessage:
    """Keeps one Discord message up to date, at most once per interval."""

    def __init__(self, interaction: discord.Interaction, interval: float):
        self.interaction, self.interval = interaction, interval
        self.last_edit = 0.0
        self.pending: Optional[str] = None

    async def update(self, text: str, force: bool = False) -> None:
        self.pending = text
        if not force and time.monotonic() - self.last_edit < self.interval:
            return
        self.last_edit = time.monotonic()
        try:
            await self.interaction.edit_original_response(content=text[:2000])
        except discord.HTTPException as exc:  # e.g. the 15-minute interaction token expired
            log.warning("progress edit failed: %r", exc)


def result_embed(result: RetrainResult) -> discord.Embed:
    embed = discord.Embed(title=f"Retrain {result.status}", description=result.message[:4000],
                          color=RESULT_COLORS.get(result.status, 0xE74C3C))
    if result.report:
        embed.add_field(name="Gate", value=summarize_report(result.report)[:1024], inline=False)
    embed.set_footer(text=f"{result.n_corrections} corrections · {result.seconds:.0f} s")
    return embed


async def post_result(channel: discord.abc.Messageable, result: RetrainResult) -> None:
    """The run's outcome with the gate report and its chart."""
    embed = result_embed(result)
    if result.chart:
        embed.set_image(url=f"attachment://{result.chart.name}")
        await channel.send(embed=embed, file=discord.File(result.chart, filename=result.chart.name))
    else:
        await channel.send(embed=embed)


async def run_retrain(runtime: Runtime, interaction: discord.Interaction) -> None:
    progress = ProgressMessage(interaction, runtime.cfg.discord.edit_interval_s)

    async def relay(event: dict) -> None:
        if event.get("event") in tuple(EventKind):
            await progress.update(format_progress(event), force=event.get("event") != EventKind.PROGRESS)

    try:
        result = await runtime.retrain(RunTrigger.MANUAL, interaction.user.id, relay)
    except RetrainRefused as exc:
        await progress.update(f"Retrain not started: {exc}", force=True)
        return
    await progress.update(f"{'✅' if result.status == RunStatus.SUCCEEDED else '❌'} {result.message}", force=True)
    await post_result(interaction.channel, result)


# ------------------------------------------------------------------- the commands


MEMORY_LIST_LIMIT = 15  # facts /memory shows (one Discord message)


def mention(user_id: int) -> str:
    return f"<@{user_id}>"  # rendered as a name; allowed_mentions keeps it from pinging


def admin_commands(runtime: Runtime):
    """A `LoopcordBot` command setup registering the admin commands."""

    def setup(tree: app_commands.CommandTree, bot) -> None:
        @tree.command(name="corrections", description="Review pending corrections (admins)")
        async def corrections(interaction: discord.Interaction) -> None:
            if await refuse_unless_admin(runtime, interaction):
                return
            view = ReviewView(runtime)
            content, embeds = await view.load()
            await interaction.response.send_message(content, embeds=embeds, view=view, ephemeral=True)

        @tree.command(name="reopen", description="Put a reviewed correction back to pending (admins)")
        @app_commands.describe(correction="The correction's number, e.g. 3")
        async def reopen(interaction: discord.Interaction, correction: int) -> None:
            if await refuse_unless_admin(runtime, interaction):
                return
            try:
                view = await admin.reopen(runtime.core.store, correction, runtime.cfg)
                text = f"Correction #{view.id} is pending again; review it with /corrections."
            except admin.AdminError as exc:
                text = str(exc)
            await interaction.response.send_message(text, ephemeral=True)

        @tree.command(name="memory", description="Facts this server's approved corrections taught (admins)")
        @app_commands.describe(search="Show the facts closest to this text (default: the latest)")
        async def memory(interaction: discord.Interaction, search: Optional[str] = None) -> None:
            if await refuse_unless_admin(runtime, interaction):
                return
            mem, scope = runtime.core.memory, scope_of(interaction.guild_id, interaction.channel_id)
            if not mem.on:
                text = admin.memory_line(mem, 0)
            elif search:
                text = admin.render_facts(await mem.search(scope, search, MEMORY_LIST_LIMIT), mention)
            else:
                entries = await runtime.core.store.memory_entries(scope)
                text = admin.render_facts([fact_of(e) for e in entries[-MEMORY_LIST_LIMIT:]], mention)
            await interaction.response.send_message(admin.preview(text, 2000), ephemeral=True,
                                                    allowed_mentions=discord.AllowedMentions.none())

        @tree.command(name="retract", description="Take a fact out of the memory and later training (admins)")
        @app_commands.describe(fact="The fact's number (/memory shows it), e.g. 3")
        async def retract(interaction: discord.Interaction, fact: int) -> None:
            if await refuse_unless_admin(runtime, interaction):
                return
            try:
                view = await admin.retract(runtime.core.store, runtime.core.memory, fact, interaction.user.id)
                text = f"Fact #{view.id} retracted: it no longer answers and later retrains leave it out."
            except admin.AdminError as exc:
                text = str(exc)
            await interaction.response.send_message(text, ephemeral=True)

        @tree.command(name="retrain", description="Learn the approved corrections now (admins)")
        async def retrain(interaction: discord.Interaction) -> None:
            if await refuse_unless_admin(runtime, interaction):
                return
            try:
                text = await runtime.retrainer.announcement()
            except RetrainRefused as exc:
                await interaction.response.send_message(f"Retrain not started: {exc}", ephemeral=True)
                return
            await interaction.response.send_message(f"🛠️ {text}")
            await run_retrain(runtime, interaction)

        @tree.command(name="rollback", description="Go back to an earlier adapter version (admins)")
        @app_commands.describe(version="Version to go back to (default: the previous one)")
        async def rollback(interaction: discord.Interaction, version: Optional[str] = None) -> None:
            if await refuse_unless_admin(runtime, interaction):
                return
            await interaction.response.defer(thinking=True)
            try:
                text = await runtime.rollback(version)
            except RetrainRefused as exc:
                text = f"Rollback not done: {exc}"
            except Exception as exc:  # a worker that refuses the load, say
                log.exception("rollback failed")
                text = f"Rollback failed: {getattr(exc, 'message', exc)}"
            await interaction.edit_original_response(content=text)

        @tree.command(name="status", description="Model, adapter, worker and feedback status (admins)")
        async def status(interaction: discord.Interaction) -> None:
            if await refuse_unless_admin(runtime, interaction):
                return
            await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.edit_original_response(content=(await runtime.status())[:2000])

    return setup


async def announce_to_admin_channel(bot: discord.Client, runtime: Runtime, result: RetrainResult) -> None:
    """Post a scheduled run's result to `discord.admin_channel` (or just log it)."""
    channel_id = runtime.cfg.discord.admin_channel
    channel = bot.get_channel(channel_id) if channel_id else None
    if channel is None and channel_id:
        try:
            channel = await bot.fetch_channel(channel_id)
        except discord.HTTPException as exc:
            log.error("cannot reach admin channel %s: %r", channel_id, exc)
    if channel is None:
        log.info("scheduled retrain: %s", result.message)
        return
    await post_result(channel, result)


def start_schedule(bot: discord.Client, runtime: Runtime) -> Optional[asyncio.Task]:
    from bot.schedule import run_schedule

    t = runtime.cfg.training
    if t.schedule_hours <= 0:
        return None

    async def announce(result: RetrainResult) -> None:
        await announce_to_admin_channel(bot, runtime, result)

    return asyncio.create_task(run_schedule(runtime.retrainer, t.schedule_hours, t.schedule_min_corrections, announce))
