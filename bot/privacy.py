"""/forget-me beyond the database: the user's text in files the retrains left behind.

A retrain exports approved corrections to `training.work_dir/run-*/corrections.jsonl`,
and the trainer copies each correction (question and text) into its version's
`manifest.json` and gate report `eval.json` in the registry. `forget_files` rewrites
those files without the records of the forgotten corrections, so the next retrain's
replay (which reads the store's export and the manifests' lineage) no longer sees
them. An adapter already trained keeps what it learned until the next retrain
replaces it; the README says so.

Files are rewritten by replace-on-rename (never half-written, so a retrain reading
one at the same moment sees the old or the new file, whole).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from trainer.registry import write_json_atomic, write_text_atomic

from model.config import Config

from bot.store import Forgotten, Store, without_corrections

log = logging.getLogger(__name__)

RUN_EXPORT_GLOB = "*/corrections.jsonl"  # under training.work_dir
REGISTRY_JSON = ("manifest.json", "eval.json")  # in each registry version directory


@dataclass(frozen=True)
class FilesForgotten:
    files_rewritten: int
    records_removed: int


@dataclass(frozen=True)
class ForgetReport:
    """Everything /forget-me removed; `message()` is what the user reads (Discord and terminal)."""

    store: Forgotten
    files: FilesForgotten

    def message(self) -> str:
        c = self.store.counts
        rows = c.get("exchanges", 0) + c.get("flags", 0) + c.get("corrections", 0)
        parts = [_plural(c.get("exchanges", 0), "answer to you", "answers to you"),
                 _plural(c.get("flags", 0), "reaction", "reactions"),
                 _plural(c.get("corrections", 0), "correction", "corrections")]
        text = f"Done: I deleted {rows} stored rows about you (" + ", ".join(parts) + ")."
        if c.get("exchanges_blanked"):
            text += (f" {c['exchanges_blanked']} of your questions had corrections from other people:"
                     " your words are gone, their corrections stay on record but will not be trained.")
        if self.files.records_removed:
            text += f" Removed from {self.files.files_rewritten} training files too."
        return text + (" A model already trained keeps what it learned until the next retrain,"
                       " which no longer uses your text.")


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


async def forget_everywhere(cfg: Config, store: Store, user_id: int) -> ForgetReport:
    """The database first (the source of every export), then the files made from it."""
    forgotten = await store.forget_user(user_id)
    files = forget_files(forgotten.correction_ids, cfg.path(cfg.training.work_dir),
                         cfg.path(cfg.training.registry_dir))
    log.info("forgot user %s: %s; files: %s", user_id, forgotten.counts, files)
    return ForgetReport(forgotten, files)


def scrub_jsonl(path: Path, correction_ids: set[int]) -> int:
    """Drop the records of `correction_ids` from a JSONL export; returns how many went."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            kept.append(line)  # not ours to judge; leave it
            continue
        if not (isinstance(record, dict) and record.get("id") in correction_ids):
            kept.append(line)
    removed = len(lines) - len(kept)
    if removed:
        write_text_atomic(path, "".join(kept))
    return removed


def scrub_json(path: Path, correction_ids: set[int]) -> int:
    """Drop correction records (mappings with that "id" and a "correction") from a JSON file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("forget: %s is not valid JSON; left as it is", path)
        return 0
    cleaned = without_corrections(data, correction_ids)
    if cleaned == data:
        return 0
    write_json_atomic(path, cleaned)
    return 1


def forget_files(correction_ids: Iterable[int], work_dir: Path, registry_dir: Path) -> FilesForgotten:
    """Remove the forgotten corrections from run exports and registry manifests/reports."""
    ids = set(correction_ids)
    files = removed = 0
    if not ids:
        return FilesForgotten(0, 0)
    for path in sorted(work_dir.glob(RUN_EXPORT_GLOB)) if work_dir.is_dir() else []:
        n = scrub_jsonl(path, ids)
        files, removed = files + bool(n), removed + n
    for name in REGISTRY_JSON:
        for path in sorted(registry_dir.glob(f"*/{name}")) if registry_dir.is_dir() else []:
            n = scrub_json(path, ids)
            files, removed = files + n, removed + n
    return FilesForgotten(files, removed)
