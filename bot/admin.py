"""Admin operations, free of Discord: who is an admin, reviewing corrections,
and the status report. The Discord slash commands and the terminal mode both
call these, so both behave the same."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from bot.store import MAX_CORRECTION_CHARS, CorrectionStatus
from model.client import ModelError
from model.config import Config
from trainer.protocol import Verdict, forbidden_identities, identity_claims

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


def claimed_identities(cfg: Config, text: str) -> list[str]:
    """Other identities a correction's text claims for the assistant ("I am ChatGPT, made by
    OpenAI" -> ['openai', 'chatgpt']): training on it would teach the bot to be someone else."""
    return identity_claims(text, cfg.identity.name, cfg.identity.author, forbidden_identities(cfg))


def identity_warning(claims: Iterable[str]) -> Optional[str]:
    """What a reviewer (and the submitter) reads about a correction claiming another identity."""
    claims = list(claims)
    if not claims:
        return None
    return (f"⚠️ This correction claims another identity ({', '.join(claims)}): learning it would "
            "teach the assistant to call itself that, and the gate rejects such a model.")


@dataclass(frozen=True)
class CorrectionView:
    id: int
    question: str
    bad_answer: str
    proposed: str
    user_id: int
    status: str
    claims: tuple[str, ...] = ()  # other identities the text claims (see claimed_identities)
    question_forgotten: bool = False  # the asker used /forget-me

    @property
    def warning(self) -> Optional[str]:
        return identity_warning(self.claims)

    def render(self, author: Optional[str] = None) -> str:
        """Markdown for review. `author` names the submitter; default: a Discord mention."""
        question = "(deleted by the person who asked it)" if self.question_forgotten else preview(self.question)
        lines = [f"**#{self.id}** ({self.status}) from {author or f'<@{self.user_id}>'}",
                 f"**Q:** {question}",
                 f"**Bot said:** {preview(self.bad_answer)}",
                 f"**Proposed:** {preview(self.proposed)}"]
        if self.warning:
            lines.append(self.warning)
        return "\n".join(lines)


def correction_view(row: dict, cfg: Optional[Config] = None) -> CorrectionView:
    """A Store correction row (which carries its question and the bad answer) for review;
    with `cfg`, a correction claiming another identity carries a warning."""
    claims = tuple(claimed_identities(cfg, row["text"])) if cfg is not None else ()
    return CorrectionView(id=row["id"], question=row["question"], bad_answer=row["bad_answer"] or "",
                          proposed=row["text"], user_id=row["user_id"], status=row["status"],
                          claims=claims, question_forgotten=bool(row.get("forgotten_at")))


async def pending_page(store, page: int, cfg: Optional[Config] = None) -> tuple[list[CorrectionView], int]:
    """One page of pending corrections and the number of pages."""
    counts = await store.count_corrections_by_status()
    total = counts.get(CorrectionStatus.PENDING, 0)
    pages = max(1, -(-total // CORRECTIONS_PAGE_SIZE))
    page = min(max(0, page), pages - 1)
    rows = await store.list_corrections(status=CorrectionStatus.PENDING, limit=CORRECTIONS_PAGE_SIZE, offset=page * CORRECTIONS_PAGE_SIZE)
    return [correction_view(r, cfg) for r in rows], pages


DECISIONS = (CorrectionStatus.APPROVED, CorrectionStatus.REJECTED)


async def review(store, correction_id: int, decision: str, reviewer_id: int, text: Optional[str] = None,
                 cfg: Optional[Config] = None, memory=None) -> CorrectionView:
    """Approve / reject a correction (optionally editing the text), stored with the reviewer.

    What an admin expects from a second click: the same decision again is refused with
    "already approved/rejected" (nothing changes; an approve with a new text still edits an
    untrained correction). A rejected correction is not approved by a stray click: it must be
    reopened first (`reopen`). An approved one can still be rejected (later retrains stop
    replaying it; an adapter that already learned it needs a rollback). With `cfg`, the returned view
    carries a warning when the text claims another identity. With `memory`, an approved
    correction becomes a memory entry at once (bot.memory)."""
    if decision not in DECISIONS:
        raise AdminError(f"unknown decision {decision!r}: use approve or reject")
    if text is not None and not text.strip():
        raise AdminError("The corrected answer cannot be empty.")
    if text is not None and len(text.strip()) > MAX_CORRECTION_CHARS:
        raise AdminError(f"The corrected answer is {len(text.strip()):,} characters long; at most "
                         f"{MAX_CORRECTION_CHARS:,} are allowed.")
    row = await store.get_correction(correction_id)
    if row is None:
        raise AdminError(f"There is no correction #{correction_id}.")
    status, editing = row["status"], text is not None and text.strip() != row["text"]
    if row.get("forgotten_at") and decision == CorrectionStatus.APPROVED:
        raise AdminError(f"Correction #{correction_id} cannot be approved: the person who asked the "
                         "question deleted it (/forget-me), so there is nothing to train it on.")
    if status == decision and not (decision == CorrectionStatus.APPROVED and editing):
        raise AdminError(f"Correction #{correction_id} is already {status}; nothing changed.")
    if status == CorrectionStatus.REJECTED and decision == CorrectionStatus.APPROVED:
        raise AdminError(f"Correction #{correction_id} was rejected earlier. To approve it after all, "
                         f"reopen it first (/reopen {correction_id}), then approve it.")
    # Only from the status read above: a concurrent review (another admin) wins, this one says so.
    if not await store.set_correction_status(correction_id, decision, reviewer_id, text=text, only_from=(status,)):
        latest = await store.get_correction(correction_id)
        raise AdminError(f"Correction #{correction_id} was just reviewed by someone else; it is now "
                         f"{latest['status'] if latest else 'deleted'}.")
    if decision == CorrectionStatus.APPROVED and memory is not None:
        await memory.sync()  # the fact answers from now on (an error here leaves the approval made)
    return correction_view(await store.get_correction(correction_id), cfg)


async def reopen(store, correction_id: int, cfg: Optional[Config] = None) -> CorrectionView:
    """Put a rejected (or approved) correction back to pending review."""
    row = await store.get_correction(correction_id)
    if row is None:
        raise AdminError(f"There is no correction #{correction_id}.")
    if row["status"] == CorrectionStatus.PENDING:
        raise AdminError(f"Correction #{correction_id} is already pending review.")
    if row.get("forgotten_at"):
        raise AdminError(f"Correction #{correction_id} cannot be reopened: its question was deleted (/forget-me).")
    if not await store.set_correction_status(correction_id, CorrectionStatus.PENDING, None, only_from=(row["status"],)):
        raise AdminError(f"Correction #{correction_id} was just reviewed by someone else; look again.")
    return correction_view(await store.get_correction(correction_id), cfg)


RETRACTED_REASON = "retracted by an admin"


async def retract(store, memory, correction_id: int, admin_id: int) -> CorrectionView:
    """Take a fact out of the memory now and out of later training: its correction is
    rejected (the store drops the entry in the same transaction)."""
    row = await store.get_correction(correction_id)
    if row is None:
        raise AdminError(f"There is no fact or correction #{correction_id}. /memory lists the facts.")
    if row["status"] != CorrectionStatus.APPROVED:
        raise AdminError(f"Correction #{correction_id} is {row['status']}, not an approved fact; nothing to retract.")
    if not await store.set_correction_status(correction_id, CorrectionStatus.REJECTED, admin_id,
                                             reason=RETRACTED_REASON, only_from=(CorrectionStatus.APPROVED,)):
        raise AdminError(f"Correction #{correction_id} was just reviewed by someone else; look again.")
    return correction_view(await store.get_correction(correction_id))


def memory_line(memory, entries: int) -> str:
    if not memory.cfg.memory.enabled:
        return "**Memory:** off (memory.enabled: false)"
    if not memory.on:
        return f"**Memory:** ⚠️ off: {memory.error or 'the embedding model is not loaded'}"
    return f"**Memory:** {entries} {'fact answers' if entries == 1 else 'facts answer'} at once (/memory lists them)"


def render_facts(facts, name_of) -> str:
    """/memory's list: one line per fact, with who taught and approved it."""
    if not facts:
        return "No facts in this community's memory yet: an approved correction becomes one."
    lines = []
    for f in facts:
        score = f" (match {f.score:.2f})" if f.score else ""
        lines.append(f"#{f.correction_id}{score} Q: {preview(f.question, 120)} → {preview(f.answer, 200)}"
                     f" — {_taught_by(f, name_of)}")
    return "\n".join(lines)


def _taught_by(f, name_of) -> str:
    who = name_of(f.suggested_by) if f.suggested_by is not None else "a member"
    if f.approved_by == f.suggested_by:
        return f"from a correction by {who}"
    return f"from a correction by {who}, approved by {name_of(f.approved_by) if f.approved_by is not None else 'an admin'}"


def memory_footer(sources, quoted, name_of) -> Optional[str]:
    """The line under an answer that used the memory: who taught what it states (`sources`),
    and, when the model did not state the closest fact, that fact quoted with its source (`quoted`)."""
    parts = ["; ".join(dict.fromkeys(_taught_by(f, name_of) for f in sources))] if sources else []
    parts += [f"Confirmed here: “{preview(f.answer, 400)}” ({_taught_by(f, name_of)})" for f in quoted]
    return "📌 " + " · ".join(parts) if parts else None


async def status_report(cfg: Config, store, client, retrainer, live, registry=None, memory=None) -> str:
    """Everything an admin asks first, as text (Discord markdown is fine in a terminal).

    `live` is the Runtime's LiveAdapter (the truth about what answers use); the server's
    own account is shown when it gives one (vLLM's /health is an empty 200)."""
    lines = [f"**Base model:** {cfg.model.base or 'SmolLM2-135M-Instruct (the embedded default)'}"]
    lines.append(f"**Live adapter:** {live.version or 'none (the base model answers)'}"
                 + (f" (since {live.since or 'unknown'})" if live.version else ""))
    if registry is not None and live.version:
        lines += _version_lines(registry, live.version)
    lines += await _server_lines(cfg, client, live)
    if retrainer is not None and retrainer.running:
        lines.append("**Retrain:** running now")
    flags = await store.count_flags_by_kind()
    corrections = await store.count_corrections_by_status()
    lines.append("**Flags:** " + (", ".join(f"{k} {v}" for k, v in sorted(flags.items())) or "none"))
    lines.append("**Corrections:** " + (", ".join(f"{k} {v}" for k, v in sorted(corrections.items())) or "none"))
    lines.append(f"**Approved, not yet trained:** {await store.count_untrained_approved()}")
    if memory is not None:
        lines.append(memory_line(memory, await store.count_memory()))
    run = await store.last_run()
    if run:
        lines.append(
            f"**Last run:** #{run['id']} {run['status']} → {run['version'] or '-'} "
            f"({run['trigger']}, {run['started_at']}) {run['message'] or ''}".rstrip()
        )
        lines += [f"**Not learned in run #{run['id']}:** {line}" for line in not_learned_lines(run.get("report"))]
    return "\n".join(lines)


def not_learned_lines(report: Optional[dict]) -> list[str]:
    """One line per correction a gated candidate did not learn, with what it answered."""
    items = (((report or {}).get("candidate") or {}).get("corrections") or {}).get("items") or []
    return [f"#{i.get('id')} {preview(i.get('correction'), 80)!r}: it answered {preview(i.get('answer'), 120)!r}"
            for i in items if not i.get("learned")]


def _version_lines(registry, version: str) -> list[str]:
    """What the live version was trained on, its gate result, and the rollback stack."""
    from trainer.registry import RegistryError

    try:
        manifest = registry.get(version)
        stack = registry.promotion_stack()
    except RegistryError as exc:
        return [f"**Registry:** ⚠️ {exc}"]
    n = len(manifest.get("corrections") or [])
    trained = f"{manifest.get('stage') or '?'} stage" + (f", {n} correction{'s' if n != 1 else ''}" if n else "")
    gate = manifest.get("gate") or {}
    verdict = {True: Verdict.PASSED, False: Verdict.FAILED}.get(gate.get("passed"), "not run")
    metrics = manifest.get("metrics") or {}
    scores = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in metrics.items()
                       if k in ("identity_accuracy", "corrections_learned", "corrections_carried_over",
                                "general_retention") and isinstance(v, (int, float)))
    out = [f"**Trained on:** {trained} (parent {manifest.get('parent') or 'base'})",
           f"**Gate:** {verdict}" + (f" ({scores})" if scores else "")
           + (f"; failed {', '.join(gate['failed'])}" if gate.get("failed") else "")]
    earlier = [v for v in stack if v != version]
    out.append("**Rollback history:** " + (" → ".join(stack) + f" (/rollback goes to {earlier[-1]})"
                                           if earlier else "nothing earlier to roll back to"))
    return out


async def _server_lines(cfg: Config, client, live) -> list[str]:
    try:
        health = await client.health()
    except ModelError as exc:
        return [f"**Worker:** unreachable ({exc.message})"]
    if health:
        line = (f"**Worker:** up on {health.get('device', '?')}, queue {health.get('queue_depth', 0)}, "
                f"running {health.get('running', 0)}" + (", asleep" if health.get("sleeping") else ""))
        if health.get("status") == "unhealthy":
            line += (f" — ⚠️ its last {health.get('failures_in_a_row', 'few')} answers failed in the model "
                     "(the bot restarts its own worker; details in the worker's log)")
    else:
        line = f"**Worker:** up at {client.base_url} (its /health gives no details)"
    lines = [line]
    try:
        models = await client.models()
    except ModelError:
        return lines
    served = {m.get("id"): m for m in models if isinstance(m, dict)}
    entry = served.get(cfg.model.served_name)
    if live.version and entry is None:
        lines.append(f"**Server:** ⚠️ does not list {cfg.model.served_name!r}; answers will fail until it is loaded")
    elif entry is not None:
        root = entry.get("root") or ""
        where = f" from {root}" if root else ""
        lines.append(f"**Server:** serves {cfg.model.served_name!r}{where}")
        if live.path and root and Path(root).name != Path(live.path).name:
            lines.append(f"**Server:** ⚠️ that is not the live version {live.version}")
    return lines
