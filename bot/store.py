"""The bot's SQLite store: exchanges, feedback (flags, corrections) and training runs.

One aiosqlite connection per store, WAL mode, foreign keys on. Every answer the
bot posts is an *exchange* row holding the exact prompt messages sent to the
model, so a flag or a correction that arrives after a restart still maps to a
training sample. The schema is versioned with `PRAGMA user_version`; each entry
of `MIGRATIONS` moves the file one version forward inside a transaction.

Writes go through one asyncio lock (one writer at a time on one connection) and
are retried when another process holds the database (`SQLITE_BUSY`). A full disk
is a `StoreFull` naming the file, never a confusing follow-on error.

Privacy: the file is created 0600 in a 0700 directory (it holds what users
wrote), `secure_delete` is on so deleted text is overwritten, and
`forget_user` checkpoints and vacuums so no copy lingers in the WAL.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import os
import re
import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Optional, Sequence, TypeVar

import aiosqlite

# MAX_CORRECTION_CHARS: bot.core and bot.admin import it from here
from trainer.protocol import MAX_CORRECTION_CHARS, CorrectionRecord  # noqa: F401

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000  # SQLite waits this long for another process's lock
BUSY_RETRIES = 5  # then we retry the whole statement this many times
BUSY_RETRY_DELAY_S = 0.2
DB_FILE_MODE = 0o600  # the store holds what users wrote: owner only
DB_DIR_MODE = 0o700
# The asker of a forgotten exchange that others' corrections still point at (ids are positive).
FORGOTTEN_USER_ID = -1
FORGOTTEN_REASON = "its question was deleted by the person who asked it (/forget-me)"

# A correction's text is trained on, shown in reviews and quoted in prompts: longer than
# MAX_CORRECTION_CHARS is refused when it is made (and by the trainer: one limit, trainer.protocol).


# ---- what the store's status columns may hold -------------------------------------------
# Each set is spelled here once: the code uses the members, the schema's CHECK constraints are
# built from them (_check), and `open` refuses a file whose constraints say otherwise. The values
# are what is on disk: renaming one, or adding one, needs a migration that rebuilds its table
# (as v3 did for cancelled runs); the open-time check fails until there is one.


class AnswerStatus(StrEnum):
    """exchanges.status: how an answer ended."""

    COMPLETE = "complete"
    CUT_OFF = "cut_off"
    ERROR = "error"


class FlagKind(StrEnum):
    """flags.kind: a 👎 or a 👍 on an answer."""

    BAD = "bad"
    GOOD = "good"


class CorrectionStatus(StrEnum):
    """corrections.status: waiting for review, approved (trained on, in the memory) or rejected."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class RunTrigger(StrEnum):
    """training_runs.trigger: who started a retrain."""

    MANUAL = "manual"
    SCHEDULE = "schedule"


class RunStatus(StrEnum):
    """training_runs.status: how a retrain ended (bot.retrain)."""

    RUNNING = "running"  # under way (or the bot died during it: closed as crashed at the next start)
    SUCCEEDED = "succeeded"  # gate passed, promoted, live
    FAILED = "failed"  # the trainer refused a correction, or passed but could not be promoted or loaded; unchanged
    REJECTED = "rejected"  # the gate said no; the live adapter is unchanged
    CRASHED = "crashed"  # the trainer died; unchanged
    CANCELLED = "cancelled"  # someone cancelled it (Ctrl-C, shutdown); unchanged


def _sql(value: str) -> str:
    """A string as an SQL literal."""
    return "'" + str(value).replace("'", "''") + "'"


def _check(column: str, allowed: Iterable[str]) -> str:
    """`CHECK (column IN ('a', 'b'))` for the allowed values, in their order."""
    return f"CHECK ({column} IN ({', '.join(_sql(v) for v in allowed)}))"


_APPROVED = _sql(CorrectionStatus.APPROVED)  # in queries that take no parameters for it

# (table, column, the set its CHECK constraint allows now); `open` compares them with the file.
STATUS_COLUMNS: tuple[tuple[str, str, type[StrEnum]], ...] = (
    ("exchanges", "status", AnswerStatus),
    ("flags", "kind", FlagKind),
    ("corrections", "status", CorrectionStatus),
    ("training_runs", "trigger", RunTrigger),
    ("training_runs", "status", RunStatus),
)

# Each script moves the schema from version i to i+1. Append, never edit.
MIGRATIONS: list[str] = [
    # v1: the initial schema (its runs could not yet be cancelled).
    f"""
    CREATE TABLE exchanges (
        id INTEGER PRIMARY KEY,
        guild_id INTEGER,
        channel_id INTEGER,
        user_id INTEGER NOT NULL,
        request_message_id INTEGER,
        answer_message_ids TEXT NOT NULL DEFAULT '[]',
        prompt_messages TEXT NOT NULL,
        answer TEXT NOT NULL,
        model TEXT,
        adapter_version TEXT,
        status TEXT NOT NULL {_check('status', AnswerStatus)},
        ttft_ms REAL,
        total_ms REAL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX exchanges_user ON exchanges(user_id);
    CREATE INDEX exchanges_channel ON exchanges(channel_id);
    -- One row per Discord message of an answer: a flag on any part finds the exchange.
    CREATE TABLE answer_messages (
        message_id INTEGER PRIMARY KEY,
        exchange_id INTEGER NOT NULL REFERENCES exchanges(id) ON DELETE CASCADE,
        part INTEGER NOT NULL
    );
    CREATE INDEX answer_messages_exchange ON answer_messages(exchange_id);
    CREATE TABLE flags (
        id INTEGER PRIMARY KEY,
        exchange_id INTEGER NOT NULL REFERENCES exchanges(id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL,
        kind TEXT NOT NULL {_check('kind', FlagKind)},
        emoji TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (exchange_id, user_id, emoji)
    );
    CREATE INDEX flags_user ON flags(user_id);
    CREATE TABLE training_runs (
        id INTEGER PRIMARY KEY,
        trigger TEXT NOT NULL {_check('trigger', RunTrigger)},
        started_by INTEGER,
        status TEXT NOT NULL
            {_check('status', [s for s in RunStatus if s != RunStatus.CANCELLED])},
        version TEXT,
        parent_version TEXT,
        report TEXT,
        message TEXT,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        n_corrections INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE corrections (
        id INTEGER PRIMARY KEY,
        exchange_id INTEGER NOT NULL REFERENCES exchanges(id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL,
        text TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT {_sql(CorrectionStatus.PENDING)}
            {_check('status', CorrectionStatus)},
        reviewer_id INTEGER,
        review_reason TEXT,
        reviewed_at TEXT,
        created_at TEXT NOT NULL,
        trained_run_id INTEGER REFERENCES training_runs(id) ON DELETE SET NULL
    );
    CREATE INDEX corrections_status ON corrections(status);
    CREATE INDEX corrections_user ON corrections(user_id);
    """,
    # v2: an exchange whose asker used /forget-me while others' corrections point at it
    # keeps its row (so their corrections stay on record) but loses the asker's text.
    """
    ALTER TABLE exchanges ADD COLUMN forgotten_at TEXT;
    """,
    # v3: the community memory (an approved correction, live at once, one entry per correction,
    # gone with it), and runs that were cancelled (the table rebuilt for the new CHECK; the
    # migration runs with foreign keys off, as SQLite's procedure for this requires).
    f"""
    CREATE TABLE memory (
        correction_id INTEGER PRIMARY KEY REFERENCES corrections(id) ON DELETE CASCADE,
        scope TEXT NOT NULL,
        question TEXT NOT NULL,
        answer TEXT NOT NULL,
        suggested_by INTEGER,
        approved_by INTEGER,
        created_at TEXT NOT NULL,
        embedding_model TEXT NOT NULL,
        embedding BLOB NOT NULL
    );
    CREATE INDEX memory_scope ON memory(scope);
    CREATE TABLE training_runs_v3 (
        id INTEGER PRIMARY KEY,
        trigger TEXT NOT NULL {_check('trigger', RunTrigger)},
        started_by INTEGER,
        status TEXT NOT NULL
            {_check('status', RunStatus)},
        version TEXT,
        parent_version TEXT,
        report TEXT,
        message TEXT,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        n_corrections INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO training_runs_v3 SELECT id, trigger, started_by, status, version, parent_version, report,
        message, started_at, finished_at, n_corrections FROM training_runs;
    DROP TABLE training_runs;
    ALTER TABLE training_runs_v3 RENAME TO training_runs;
    """,
]


class StoreError(RuntimeError):
    """The store cannot be used; the message names the file and what is wrong."""


class StoreFull(StoreError):
    """The disk (or the file's size limit) is full: nothing was written."""


class TooManyPending(ValueError):
    """A user already has the allowed number of corrections waiting for review."""

    def __init__(self, limit: int):
        super().__init__(f"You already have {limit} corrections waiting for review; "
                         "please wait until an admin has looked at them.")
        self.limit = limit


def now_iso() -> str:
    """UTC timestamp in ISO 8601 with milliseconds (sorts as text)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _checked_values(create_sql: str, column: str) -> set[str]:
    """The values `CHECK (column IN (...))` allows in a CREATE TABLE statement (empty: no such CHECK)."""
    m = re.search(rf"CHECK\s*\(\s*{re.escape(column)}\s+IN\s*\(((?:'(?:[^']|'')*'|[\s,])*)\)\s*\)", create_sql)
    return {v.replace("''", "'") for v in re.findall(r"'((?:[^']|'')*)'", m.group(1))} if m else set()


def _split_statements(script: str) -> list[str]:
    """Split a migration script into statements (sqlite3 knows where each one ends)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        if not current and line.strip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    )


def _create_private(path: Path) -> None:
    """Create the directory (0700) and the database file (0600) before SQLite does, so the
    umask never leaves them readable by others; tighten an existing file's mode too."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=DB_DIR_MODE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, DB_FILE_MODE)
    try:
        if os.stat(path).st_mode & 0o077:
            os.fchmod(fd, DB_FILE_MODE)  # SQLite gives -wal/-shm the database file's mode
    finally:
        os.close(fd)


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


def _exchange_row(row: aiosqlite.Row) -> dict:
    out = dict(row)
    out["prompt_messages"] = json.loads(out["prompt_messages"])
    out["answer_message_ids"] = json.loads(out["answer_message_ids"])
    return out


class Store:
    """Async access to the SQLite file. Use `await Store.open(path)`; `await close()`."""

    def __init__(self, db: aiosqlite.Connection, path: Path):
        self._db = db
        self.path = path
        self._write_lock = asyncio.Lock()
        # Bumped by every write that may change the memory table: readers keep a cache per value.
        self.memory_generation = 0

    # ------------------------------------------------------------------ setup

    @classmethod
    async def open(cls, path: str | Path) -> "Store":
        """Open (creating if needed) and migrate the store; StoreError names the path."""
        path = Path(path)
        try:
            if str(path) != ":memory:":
                _create_private(path)
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from None
        db.row_factory = aiosqlite.Row
        store = cls(db, path)
        try:
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")  # WAL keeps this crash-safe
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA secure_delete = ON")  # deleted text is zeroed, not left in free pages
            await store._migrate()
            await store._check_status_columns()
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise StoreError(f"cannot open the store at {path}: {exc}") from None
        except StoreError:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        await self._db.close()

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            return (await cur.fetchone())[0]

    async def _migrate(self) -> None:
        version = await self.schema_version()
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the store at {self.path} has schema version {version}, newer than this "
                f"loopcord knows ({len(MIGRATIONS)}); upgrade loopcord or use another store.path"
            )
        # Foreign keys off while tables are rebuilt (SQLite's documented procedure: dropping a
        # parent table would otherwise act on its children), checked before each commit.
        await self._db.execute("PRAGMA foreign_keys = OFF")
        try:
            for target in range(version + 1, len(MIGRATIONS) + 1):
                await self._migrate_to(target)
        finally:
            await self._db.execute("PRAGMA foreign_keys = ON")

    async def _migrate_to(self, target: int) -> None:
        statements = _split_statements(MIGRATIONS[target - 1])
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                await self._db.execute(statement)
            async with self._db.execute("PRAGMA foreign_key_check") as cur:
                if await cur.fetchone() is not None:
                    raise StoreError(f"the store at {self.path}: migration to version {target} "
                                     "would break a foreign key; nothing was changed")
            await self._db.execute(f"PRAGMA user_version = {target}")
            await self._db.execute("COMMIT")
        except BaseException as exc:
            await self._rollback()
            if _is_full(exc):
                raise self._full_error() from None
            raise
        log.info("store %s migrated to schema version %d", self.path, target)

    async def _check_status_columns(self) -> None:
        """Every status column's CHECK allows exactly its set (STATUS_COLUMNS): a value added to a
        set without the migration that rebuilds its table fails here, not at the first INSERT."""
        for table, column, allowed in STATUS_COLUMNS:
            row = await self._fetchone("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
            found = _checked_values(row[0] if row else "", column)
            if found != set(allowed):
                raise StoreError(
                    f"the store at {self.path}: {table}.{column} allows {sorted(found)}, but this loopcord "
                    f"uses {sorted(allowed)}; a schema migration is missing (bot.store.MIGRATIONS)")

    # -------------------------------------------------------------- plumbing

    def _full_error(self) -> StoreFull:
        return StoreFull(f"disk full: cannot write to the store at {self.path}; "
                         "free some space (nothing was saved from this action)")

    async def _rollback(self) -> None:
        """Roll back if a transaction is still open. SQLite ends some failed transactions
        itself (SQLITE_FULL does), and a ROLLBACK then would replace the real error with
        "cannot rollback - no transaction is active"."""
        if self._db.in_transaction:
            try:
                await self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("rollback after a failed write failed too: %s", exc)

    async def _transact(self, body: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `body` in one write transaction; retried when another process holds the lock."""
        async with self._write_lock:
            for attempt in range(BUSY_RETRIES + 1):
                try:
                    await self._db.execute("BEGIN IMMEDIATE")
                    try:
                        result = await body(self._db)
                        await self._db.execute("COMMIT")
                        return result
                    except BaseException:
                        await self._rollback()
                        raise
                except sqlite3.OperationalError as exc:
                    if _is_full(exc):
                        raise self._full_error() from None
                    if not _is_busy(exc) or attempt == BUSY_RETRIES:
                        raise
                    log.warning("store busy (%s), retrying", exc)
                    await asyncio.sleep(BUSY_RETRY_DELAY_S * (attempt + 1))
        raise AssertionError("unreachable")

    async def _write(self, statements: Sequence[tuple[str, Iterable[Any]]]) -> list[aiosqlite.Cursor]:
        """Run statements in one transaction; returns their cursors (rowcount, lastrowid)."""

        async def body(db: aiosqlite.Connection) -> list[aiosqlite.Cursor]:
            return [await db.execute(sql, tuple(args)) for sql, args in statements]

        return await self._transact(body)

    async def _fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        async with self._db.execute(sql, tuple(args)) as cur:
            return list(await cur.fetchall())

    async def _fetchone(self, sql: str, args: Iterable[Any] = ()) -> Optional[aiosqlite.Row]:
        async with self._db.execute(sql, tuple(args)) as cur:
            return await cur.fetchone()

    # ------------------------------------------------------------- exchanges

    async def log_exchange(
        self,
        *,
        user_id: int,
        prompt_messages: list[dict],
        answer: str,
        status: str,
        guild_id: Optional[int] = None,
        channel_id: Optional[int] = None,
        request_message_id: Optional[int] = None,
        answer_message_ids: Sequence[int] = (),
        model: Optional[str] = None,
        adapter_version: Optional[str] = None,
        ttft_ms: Optional[float] = None,
        total_ms: Optional[float] = None,
    ) -> int:
        """Record one posted answer with its exact prompt; returns the exchange id."""
        if status not in tuple(AnswerStatus):
            raise ValueError(f"exchange status must be one of {tuple(map(str, AnswerStatus))}, got {status!r}")
        ids = [int(m) for m in answer_message_ids]

        async def body(db: aiosqlite.Connection) -> int:
            # One transaction for the exchange and its message-id index rows.
            cur = await db.execute(
                "INSERT INTO exchanges (guild_id, channel_id, user_id, request_message_id,"
                " answer_message_ids, prompt_messages, answer, model, adapter_version, status,"
                " ttft_ms, total_ms, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    guild_id, channel_id, user_id, request_message_id, json.dumps(ids),
                    json.dumps(prompt_messages, ensure_ascii=False), answer, model,
                    adapter_version, status, ttft_ms, total_ms, now_iso(),
                ),
            )
            await db.executemany(
                "INSERT OR REPLACE INTO answer_messages (message_id, exchange_id, part) VALUES (?,?,?)",
                [(mid, cur.lastrowid, i) for i, mid in enumerate(ids)],
            )
            return cur.lastrowid

        return await self._transact(body)

    async def set_answer_messages(self, exchange_id: int, message_ids: Sequence[int]) -> None:
        """Replace the Discord message ids of an exchange's answer (e.g. after a late split)."""
        ids = [int(m) for m in message_ids]
        await self._write(
            [("UPDATE exchanges SET answer_message_ids = ? WHERE id = ?", (json.dumps(ids), exchange_id)),
             ("DELETE FROM answer_messages WHERE exchange_id = ?", (exchange_id,))]
            + [("INSERT OR REPLACE INTO answer_messages (message_id, exchange_id, part) VALUES (?,?,?)",
                (mid, exchange_id, i)) for i, mid in enumerate(ids)]
        )

    async def get_exchange(self, exchange_id: int) -> Optional[dict]:
        row = await self._fetchone("SELECT * FROM exchanges WHERE id = ?", (exchange_id,))
        return _exchange_row(row) if row else None

    async def exchange_by_message(self, message_id: int) -> Optional[dict]:
        """The exchange whose answer includes Discord message `message_id`, or None."""
        row = await self._fetchone(
            "SELECT e.* FROM answer_messages m JOIN exchanges e ON e.id = m.exchange_id"
            " WHERE m.message_id = ?",
            (message_id,),
        )
        return _exchange_row(row) if row else None

    async def has_exchanges_in_channel(self, channel_id: int) -> bool:
        row = await self._fetchone("SELECT 1 FROM exchanges WHERE channel_id = ? LIMIT 1", (channel_id,))
        return row is not None

    # ----------------------------------------------------------------- flags

    async def add_flag(self, exchange_id: int, user_id: int, kind: str, emoji: str) -> bool:
        """Record a reaction; one per (exchange, user, emoji). True if it was new."""
        if kind not in tuple(FlagKind):
            raise ValueError(f"flag kind must be one of {tuple(map(str, FlagKind))}, got {kind!r}")
        (cur,) = await self._write(
            [("INSERT OR IGNORE INTO flags (exchange_id, user_id, kind, emoji, created_at)"
              " VALUES (?,?,?,?,?)", (exchange_id, user_id, kind, emoji, now_iso()))]
        )
        return cur.rowcount > 0

    async def remove_flag(self, exchange_id: int, user_id: int, emoji: str) -> bool:
        (cur,) = await self._write(
            [("DELETE FROM flags WHERE exchange_id = ? AND user_id = ? AND emoji = ?",
              (exchange_id, user_id, emoji))]
        )
        return cur.rowcount > 0

    async def list_flags(self, exchange_id: int) -> list[dict]:
        rows = await self._fetchall(
            "SELECT * FROM flags WHERE exchange_id = ? ORDER BY id", (exchange_id,)
        )
        return [dict(r) for r in rows]

    async def count_flags_by_kind(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT kind, COUNT(*) AS n FROM flags GROUP BY kind")
        counts = {str(k): 0 for k in FlagKind}
        counts.update({r["kind"]: r["n"] for r in rows})
        return counts

    # ----------------------------------------------------------- corrections

    async def add_correction(
        self,
        exchange_id: int,
        user_id: int,
        text: str,
        *,
        status: str = CorrectionStatus.PENDING,
        reviewer_id: Optional[int] = None,
        reason: Optional[str] = None,
        max_pending: int = 0,
    ) -> int:
        """Store a correction of an answer; approved ones carry their reviewer.

        With `max_pending` > 0, a pending correction from a user who already has that many
        waiting raises TooManyPending (counted in the same transaction, so a burst cannot
        slip past the limit)."""
        if status not in tuple(CorrectionStatus):
            raise ValueError(f"correction status must be one of {tuple(map(str, CorrectionStatus))}, got {status!r}")
        reviewed_at = now_iso() if status != CorrectionStatus.PENDING else None

        async def body(db: aiosqlite.Connection) -> int:
            if status == CorrectionStatus.PENDING and max_pending > 0:
                async with db.execute("SELECT COUNT(*) FROM corrections WHERE user_id = ? AND status = ?",
                                      (user_id, CorrectionStatus.PENDING)) as cur:
                    if (await cur.fetchone())[0] >= max_pending:
                        raise TooManyPending(max_pending)
            cur = await db.execute(
                "INSERT INTO corrections (exchange_id, user_id, text, status, reviewer_id,"
                " review_reason, reviewed_at, created_at) VALUES (?,?,?,?,?,?,?,?)",
                (exchange_id, user_id, text, status, reviewer_id, reason, reviewed_at, now_iso()))
            return cur.lastrowid

        return await self._transact(body)

    async def count_pending_of(self, user_id: int) -> int:
        row = await self._fetchone(
            "SELECT COUNT(*) FROM corrections WHERE user_id = ? AND status = ?", (user_id, CorrectionStatus.PENDING))
        return row[0]

    async def get_correction(self, correction_id: int) -> Optional[dict]:
        row = await self._fetchone(
            _CORRECTION_SELECT + " WHERE c.id = ?", (correction_id,)
        )
        return _correction_row(row) if row else None

    async def set_correction_status(
        self,
        correction_id: int,
        status: str,
        reviewer_id: Optional[int],
        text: Optional[str] = None,
        reason: Optional[str] = None,
        only_from: Optional[Sequence[str]] = None,
    ) -> bool:
        """Review a correction (optionally editing its text). False if it does not exist, or
        (with `only_from`) if its status is no longer one of those: a concurrent review won.
        Its memory entry goes in the same transaction when it leaves "approved" or its text
        changes (bot.memory adds the entry for what is approved now)."""
        if status not in tuple(CorrectionStatus):
            raise ValueError(f"correction status must be one of {tuple(map(str, CorrectionStatus))}, got {status!r}")
        reviewed_at = now_iso() if status != CorrectionStatus.PENDING else None
        sql = ("UPDATE corrections SET status = ?, reviewer_id = ?, reviewed_at = ?, review_reason = ?"
               + (", text = ?" if text is not None else "") + " WHERE id = ?"
               + (f" AND status IN ({','.join('?' * len(only_from))})" if only_from else ""))
        args: list[Any] = [status, reviewer_id, reviewed_at, reason]
        if text is not None:
            args.append(text)
        args.append(correction_id)
        args.extend(only_from or ())

        async def body(db: aiosqlite.Connection) -> bool:
            cur = await db.execute(sql, args)
            if cur.rowcount == 0:
                return False
            if status != CorrectionStatus.APPROVED or text is not None:
                await db.execute("DELETE FROM memory WHERE correction_id = ?", (correction_id,))
            return True

        try:
            return await self._transact(body)
        finally:
            self.memory_generation += 1

    async def list_corrections(
        self, status: Optional[str] = None, limit: int = 20, offset: int = 0
    ) -> list[dict]:
        """Corrections, oldest first, with the exchange's question and bad answer."""
        where, args = ("", []) if status is None else (" WHERE c.status = ?", [status])
        rows = await self._fetchall(
            _CORRECTION_SELECT + where + " ORDER BY c.id LIMIT ? OFFSET ?", args + [limit, offset]
        )
        return [_correction_row(r) for r in rows]

    async def count_corrections_by_status(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT status, COUNT(*) AS n FROM corrections GROUP BY status")
        counts = {str(s): 0 for s in CorrectionStatus}
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    async def count_untrained_approved(self, approved_after: Optional[str] = None) -> int:
        """Approved corrections no promoted run has learned yet (with `approved_after`, an ISO
        time: only those approved since then)."""
        since, args = ("", ()) if approved_after is None else (" AND c.reviewed_at > ?", (approved_after,))
        row = await self._fetchone(
            "SELECT COUNT(*) FROM corrections c JOIN exchanges e ON e.id = c.exchange_id"
            f" WHERE c.status = {_APPROVED} AND c.trained_run_id IS NULL AND e.forgotten_at IS NULL" + since, args
        )
        return row[0]

    async def export_approved_corrections(self, only_untrained: bool = False) -> list[dict]:
        """Approved corrections as the trainer reads them (trainer.protocol.CorrectionRecord,
        one JSON object per line of the exported file), oldest first.

        Corrections whose question was forgotten are left out: without it there is no
        sample to train, and its text must not travel to the trainer again."""
        where = " AND c.trained_run_id IS NULL" if only_untrained else ""
        where += " AND e.forgotten_at IS NULL"
        rows = await self._fetchall(
            "SELECT c.id, c.exchange_id, c.text, c.user_id, c.reviewer_id, c.created_at,"
            " c.reviewed_at, e.prompt_messages, e.answer FROM corrections c"
            " JOIN exchanges e ON e.id = c.exchange_id"
            f" WHERE c.status = {_APPROVED}" + where + " ORDER BY c.id"
        )
        return [
            CorrectionRecord(
                id=r["id"], exchange_id=r["exchange_id"], messages=json.loads(r["prompt_messages"]),
                bad_answer=r["answer"], correction=r["text"], user_id=r["user_id"], approved_by=r["reviewer_id"],
                created_at=r["created_at"], approved_at=r["reviewed_at"],
            ).as_dict()
            for r in rows
        ]

    async def mark_corrections_trained(self, run_id: int, correction_ids: Sequence[int]) -> None:
        await self._write(
            [("UPDATE corrections SET trained_run_id = ? WHERE id = ?", (run_id, cid))
             for cid in correction_ids]
        )

    # ---------------------------------------------------------------- memory

    async def memory_entries(self, scope: Optional[str] = None) -> list[dict]:
        """Memory entries (all, or one scope's), oldest first, embeddings included."""
        where, args = ("", ()) if scope is None else (" WHERE scope = ?", (scope,))
        rows = await self._fetchall("SELECT * FROM memory" + where + " ORDER BY correction_id", args)
        return [dict(r) for r in rows]

    async def corrections_missing_memory(self, embedding_model: str) -> list[dict]:
        """Approved corrections (question not forgotten) with no memory entry from this model."""
        rows = await self._fetchall(
            _CORRECTION_SELECT + " LEFT JOIN memory m ON m.correction_id = c.id"
            f" WHERE c.status = {_APPROVED} AND e.forgotten_at IS NULL"
            " AND (m.correction_id IS NULL OR m.embedding_model != ?) ORDER BY c.id", (embedding_model,))
        return [_correction_row(r) for r in rows]

    async def put_memory(self, correction_id: int, text: str, row: "MemoryRow") -> bool:
        """Make correction `correction_id` a memory entry, only if it is still approved with
        this `text` (a review that happened while its embedding was computed wins)."""
        async def body(db: aiosqlite.Connection) -> bool:
            async with db.execute("SELECT reviewer_id FROM corrections WHERE id = ? AND status = ? AND text = ?",
                                  (correction_id, CorrectionStatus.APPROVED, text)) as cur:
                found = await cur.fetchone()
            if found is None:
                return False
            await _put_memory(db, correction_id, row, found[0])
            return True

        try:
            return await self._transact(body)
        finally:
            self.memory_generation += 1

    async def count_memory(self, scope: Optional[str] = None) -> int:
        where, args = ("", ()) if scope is None else (" WHERE scope = ?", (scope,))
        return (await self._fetchone("SELECT COUNT(*) FROM memory" + where, args))[0]

    # --------------------------------------------------------- training runs

    async def start_run(
        self,
        trigger: str,
        started_by: Optional[int] = None,
        parent_version: Optional[str] = None,
        n_corrections: int = 0,
    ) -> int:
        if trigger not in tuple(RunTrigger):
            raise ValueError(f"run trigger must be one of {tuple(map(str, RunTrigger))}, got {trigger!r}")
        (cur,) = await self._write(
            [("INSERT INTO training_runs (trigger, started_by, status, parent_version,"
              " started_at, n_corrections) VALUES (?,?,?,?,?,?)",
              (trigger, started_by, RunStatus.RUNNING, parent_version, now_iso(), n_corrections))]
        )
        return cur.lastrowid

    async def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        version: Optional[str] = None,
        report: Optional[dict] = None,
        message: Optional[str] = None,
    ) -> None:
        if status not in tuple(RunStatus):
            raise ValueError(f"run status must be one of {tuple(map(str, RunStatus))}, got {status!r}")
        await self._write(
            [("UPDATE training_runs SET status = ?, version = COALESCE(?, version), report = ?,"
              " message = ?, finished_at = ? WHERE id = ?",
              (status, version, json.dumps(report) if report is not None else None, message,
               now_iso(), run_id))]
        )

    async def get_run(self, run_id: int) -> Optional[dict]:
        row = await self._fetchone("SELECT * FROM training_runs WHERE id = ?", (run_id,))
        return _run_row(row) if row else None

    async def last_run(self) -> Optional[dict]:
        row = await self._fetchone("SELECT * FROM training_runs ORDER BY id DESC LIMIT 1")
        return _run_row(row) if row else None

    async def running_run(self) -> Optional[dict]:
        row = await self._fetchone(
            "SELECT * FROM training_runs WHERE status = ? ORDER BY id DESC LIMIT 1", (RunStatus.RUNNING,))
        return _run_row(row) if row else None

    # ---------------------------------------------------------------- privacy

    async def forget_user(self, user_id: int) -> Forgotten:
        """Delete everything stored about a user and what they wrote; see `Forgotten`.

        Their exchanges go with their flags and corrections, as do the flags and
        corrections they made elsewhere. An exchange of theirs that *someone else*
        corrected is kept as a husk: the asker's question, the bot's answer and the
        asker's id are blanked, the other person's correction stays on record (theirs to
        forget), and it is never exported for training again (no question, no sample;
        a still-pending one is closed as rejected with the reason). Where they reviewed a
        correction or started a run, their id is blanked, not the record. Their questions
        quoted as history in other people's prompts (a thread, a reply chain) are replaced
        by ERASED_TEXT, and gate reports kept in the runs table lose the entries of the
        corrections that went (see `Erasure`). Then the WAL is checkpointed and the file
        vacuumed (with secure_delete on), so the text is not left in the database's bytes.
        """

        async def body(db: aiosqlite.Connection) -> Forgotten:
            async def ids(sql: str, args) -> list[int]:
                async with db.execute(sql, args) as cur:
                    return [r[0] for r in await cur.fetchall()]

            owned = "(SELECT id FROM exchanges WHERE user_id = ?)"
            others = "SELECT 1 FROM corrections o WHERE o.exchange_id = e.id AND o.user_id != ?"
            husks = await ids(f"SELECT e.id FROM exchanges e WHERE e.user_id = ? AND EXISTS ({others})",
                              (user_id, user_id))
            gone_exchanges = await ids(f"SELECT e.id FROM exchanges e WHERE e.user_id = ? AND NOT EXISTS ({others})",
                                       (user_id, user_id))
            # Every correction whose exported record carries this user's text: their own, and
            # others' on their exchanges (the record holds the question).
            scrub = await ids(f"SELECT id FROM corrections WHERE user_id = ? OR exchange_id IN {owned}",
                              (user_id, user_id))
            # What they asked: the last user turn of each prompt the bot answered for them.
            async with db.execute("SELECT prompt_messages FROM exchanges WHERE user_id = ?", (user_id,)) as cur:
                asked = [_question(json.loads(r[0])) for r in await cur.fetchall()]
            erasure = Erasure(frozenset(scrub), frozenset(q for q in asked if q.strip()))
            counts = {}
            marks = ",".join("?" * len(scrub))
            cur = await db.execute(f"DELETE FROM memory WHERE correction_id IN ({marks})", scrub)
            counts["memory"] = cur.rowcount
            cur = await db.execute("DELETE FROM flags WHERE user_id = ?", (user_id,))
            counts["flags"] = cur.rowcount
            cur = await db.execute("DELETE FROM corrections WHERE user_id = ?", (user_id,))
            counts["corrections"] = cur.rowcount
            marks = ",".join("?" * len(gone_exchanges))
            if gone_exchanges:  # their flags/corrections by others go with them (cascade)
                async with db.execute(f"SELECT COUNT(*) FROM flags WHERE exchange_id IN ({marks})",
                                      gone_exchanges) as cur:
                    counts["flags"] += (await cur.fetchone())[0]
            cur = await db.execute(f"DELETE FROM exchanges WHERE id IN ({marks})", gone_exchanges)
            counts["exchanges"] = cur.rowcount
            for eid in husks:
                await db.execute(
                    "UPDATE exchanges SET user_id = ?, prompt_messages = '[]', answer = '',"
                    " request_message_id = NULL, forgotten_at = ? WHERE id = ?",
                    (FORGOTTEN_USER_ID, now_iso(), eid))
                await db.execute(
                    "UPDATE corrections SET status = ?, review_reason = ?, reviewed_at = ?"
                    " WHERE exchange_id = ? AND status = ?",
                    (CorrectionStatus.REJECTED, FORGOTTEN_REASON, now_iso(), eid, CorrectionStatus.PENDING))
            counts["exchanges_blanked"] = len(husks)
            counts["quotes_erased"] = 0
            if erasure.texts:  # their words quoted as history in others' prompts
                async with db.execute("SELECT id, prompt_messages FROM exchanges") as cur:
                    prompts = list(await cur.fetchall())
                for eid, raw in prompts:
                    prompt = json.loads(raw)
                    cleaned = erasure.apply(prompt)
                    if cleaned != prompt:
                        counts["quotes_erased"] += 1
                        await db.execute("UPDATE exchanges SET prompt_messages = ? WHERE id = ?",
                                         (json.dumps(cleaned, ensure_ascii=False), eid))
            await db.execute("UPDATE corrections SET reviewer_id = NULL WHERE reviewer_id = ?", (user_id,))
            await db.execute("UPDATE memory SET approved_by = NULL WHERE approved_by = ?", (user_id,))
            await db.execute("UPDATE training_runs SET started_by = NULL WHERE started_by = ?", (user_id,))
            async with db.execute("SELECT id, report FROM training_runs WHERE report IS NOT NULL") as cur:
                reports = list(await cur.fetchall())
            for run_id, report in reports:
                cleaned = erasure.apply(json.loads(report))
                if cleaned != json.loads(report):
                    await db.execute("UPDATE training_runs SET report = ? WHERE id = ?",
                                     (json.dumps(cleaned), run_id))
            return Forgotten(counts=counts, erasure=erasure)

        try:
            forgotten = await self._transact(body)
        finally:
            self.memory_generation += 1
        await self.compact()
        return forgotten

    async def compact(self) -> None:
        """Copy the WAL into the file, truncate it and rebuild the file: deleted rows leave
        no bytes behind (secure_delete zeroes freed pages; VACUUM drops them)."""
        async with self._write_lock:
            try:
                # execute_fetchall: an unread result row would keep a statement open and
                # VACUUM refuses to run while one is.
                await self._db.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
                await self._db.execute_fetchall("VACUUM")
                await self._db.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError as exc:
                if _is_full(exc):  # VACUUM needs room for a copy; the rows are gone already
                    raise self._full_error() from None
                raise


ERASED_TEXT = "[deleted by its author]"  # stands in for a forgotten user's words quoted elsewhere


@dataclass(frozen=True)
class Erasure:
    """What to take out of records made from the store (exported corrections, manifests,
    gate reports, other people's prompts): the correction records of `correction_ids`
    entirely, and, in a conversation's history, any user message whose text is one of
    `texts` (replaced by ERASED_TEXT, so the conversation keeps its shape). A prompt's last
    user message is its asker's own question and is never touched: someone else asking the
    same words is not the forgotten user. Matching is by exact text, so an identical
    message by someone else earlier in a history is erased too — the safe side."""

    correction_ids: frozenset[int] = frozenset()
    texts: frozenset[str] = frozenset()

    def drops(self, record: Any) -> bool:
        return isinstance(record, dict) and "correction" in record and record.get("id") in self.correction_ids

    def apply(self, data: Any) -> Any:
        """`data` (parsed JSON) with the erasure applied, wherever the records sit."""
        if isinstance(data, dict):
            return {k: self.apply(v) for k, v in data.items()}
        if isinstance(data, list):
            if data and all(isinstance(m, dict) and "role" in m for m in data):
                return self._history(data)
            return [self.apply(v) for v in data if not self.drops(v)]
        return data

    def _history(self, messages: list[dict]) -> list[dict]:
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        return [{**m, "content": ERASED_TEXT}
                if i != last_user and m.get("role") == "user" and m.get("content") in self.texts else m
                for i, m in enumerate(messages)]


@dataclass(frozen=True)
class Forgotten:
    """What `forget_user` removed: rows per table, and the erasure that files made from the
    store (run exports, registry records) need too."""

    counts: dict[str, int]
    erasure: Erasure


def _question(prompt: list) -> str:
    """The question a prompt asked: its last user turn."""
    return next((m.get("content") or "" for m in reversed(prompt)
                 if isinstance(m, dict) and m.get("role") == "user"), "")


_CORRECTION_SELECT = (
    "SELECT c.*, e.prompt_messages, e.answer AS bad_answer, e.user_id AS asker_id,"
    " e.channel_id, e.guild_id, e.forgotten_at FROM corrections c JOIN exchanges e ON e.id = c.exchange_id"
)


def _correction_row(row: aiosqlite.Row) -> dict:
    out = dict(row)
    prompt = json.loads(out.pop("prompt_messages"))
    out["messages"] = prompt
    # The question is the last user turn of the prompt the model answered.
    out["question"] = _question(prompt)
    return out


def _run_row(row: aiosqlite.Row) -> dict:
    out = dict(row)
    out["report"] = json.loads(out["report"]) if out["report"] else None
    return out


@dataclass(frozen=True)
class MemoryRow:
    """What a memory entry holds besides its correction: where it answers, what it answers,
    and the question's embedding (bot.memory computes it before the transaction)."""

    scope: str
    question: str
    answer: str
    suggested_by: Optional[int]
    embedding_model: str
    embedding: bytes


async def _put_memory(db: aiosqlite.Connection, correction_id: int, row: MemoryRow,
                      approved_by: Optional[int]) -> None:
    await db.execute(
        "INSERT OR REPLACE INTO memory (correction_id, scope, question, answer, suggested_by, approved_by,"
        " created_at, embedding_model, embedding) VALUES (?,?,?,?,?,?,?,?,?)",
        (correction_id, row.scope, row.question, row.answer, row.suggested_by, approved_by, now_iso(),
         row.embedding_model, row.embedding))
