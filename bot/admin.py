"""Admin operations, free of Discord: who is an admin, reviewing corrections,
and the status report. The Discord slash commands and the terminal mode both
call these, so both behave the same."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from model.client import ModelError
from model.config import Config

ADMINISTRATOR_PERMISSION = 1 << 3  # Discord's ADMINISTRATOR bit
CORRECTIONS_PAGE_SIZE = 5
PREVIEW_CHARS = 300  # question / answers are cut to this in review lists


class AdminError(Exception):
    """An admin action that cannot be done; str() is for the admin."""


def is_admin(cfg: Config, user_id: int, role_ids: Iterable[int], administrator: bool) -> bool:
    """Discord's administrator permission, or a user/role listed in config."""
    if administrator or user_id in cfg.discord.admin_users:
        return True
    return bool(set(role_ids) & set(cfg.discord.admin_roles))


def preview(text: Optional[str], limit: int = PREVIEW_CHARS) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


@dataclass
class CorrectionView:
    id: int
    question: str
    bad_answer: str
    proposed: str
    user_id: int
    status: str

    def render(self) -> str:
        return (
            f"**#{self.id}** ({self.status}) from <@{self.user_id}>\n"
            f"**Q:** {preview(self.question)}\n"
            f"**Bot said:** {preview(self.bad_answer)}\n"
            f"**Proposed:** {preview(self.proposed)}"
        )


def correction_view(row: dict) -> CorrectionView:
    """A Store correction row (which carries its question and the bad answer) for review."""
    return CorrectionView(id=row["id"], question=row["question"], bad_answer=row["bad_answer"] or "",
                          proposed=row["text"], user_id=row["user_id"], status=row["status"])


async def pending_page(store, page: int) -> tuple[list[CorrectionView], int]:
    """One page of pending corrections and the number of pages."""
    counts = await store.count_corrections_by_status()
    total = counts.get("pending", 0)
    pages = max(1, -(-total // CORRECTIONS_PAGE_SIZE))
    page = min(max(0, page), pages - 1)
    rows = await store.list_corrections(status="pending", limit=CORRECTIONS_PAGE_SIZE, offset=page * CORRECTIONS_PAGE_SIZE)
    return [correction_view(r) for r in rows], pages


async def review(store, correction_id: int, decision: str, reviewer_id: int, text: Optional[str] = None) -> CorrectionView:
    """Approve / reject (optionally editing the text); stored with the reviewer."""
    if decision not in ("approved", "rejected"):
        raise AdminError(f"unknown decision {decision!r}: use approve or reject")
    row = await store.get_correction(correction_id)
    if row is None:
        raise AdminError(f"There is no correction #{correction_id}.")
    if text is not None and not text.strip():
        raise AdminError("The corrected answer cannot be empty.")
    await store.set_correction_status(correction_id, decision, reviewer_id, text=text)
    return correction_view(await store.get_correction(correction_id))


async def status_report(cfg: Config, store, client, retrainer, live: dict) -> str:
    """Everything an admin asks first, as text (Discord markdown is fine in a terminal)."""
    lines = [f"**Base model:** {cfg.model.base or 'demo base (' + cfg.model.demo_dir + ')'}"]
    lines.append(f"**Live adapter:** {live.get('version') or 'none'} (since {live.get('since') or 'unknown'})")
    try:
        health = await client.health()
        lines.append(
            f"**Worker:** up on {health.get('device', '?')}, queue {health.get('queue_depth', 0)}, "
            f"running {health.get('running', 0)}" + (", asleep" if health.get("sleeping") else "")
        )
    except ModelError as exc:
        lines.append(f"**Worker:** unreachable ({exc.message})")
    if retrainer.running:
        lines.append("**Retrain:** running now")
    flags = await store.count_flags_by_kind()
    corrections = await store.count_corrections_by_status()
    lines.append("**Flags:** " + (", ".join(f"{k} {v}" for k, v in sorted(flags.items())) or "none"))
    lines.append("**Corrections:** " + (", ".join(f"{k} {v}" for k, v in sorted(corrections.items())) or "none"))
    lines.append(f"**Approved, not yet trained:** {await store.count_untrained_approved()}")
    run = await store.last_run()
    if run:
        lines.append(
            f"**Last run:** #{run['id']} {run['status']} → {run['version'] or '-'} "
            f"({run['trigger']}, {run['started_at']}) {run['message'] or ''}".rstrip()
        )
    return "\n".join(lines)
