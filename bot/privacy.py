"""/forget-me beyond the database: the user's text in files the retrains left behind.

A retrain exports approved corrections to `training.work_dir/run-*/corrections.jsonl`,
and the trainer copies each correction (question and text) into its version's
`manifest.json` and gate report `eval.json` in the registry. `forget_files` rewrites
those files with the store's `Erasure` applied (the forgotten corrections' records
dropped, the user's questions quoted in other records replaced), so the next retrain's
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

from trainer.registry import write_json_atomic, write_text_atomic

from model.config import Config

from bot.store import Erasure, Forgotten, Store

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
        if c.get("quotes_erased"):
            text += (f" Your words were also erased where {_plural(c['quotes_erased'], 'conversation', 'conversations')}"
                     " of other people quoted them.")
        if c.get("memory"):
            text += (f" {_plural(c['memory'], 'fact', 'facts')} made from your words left the memory"
                     " and no longer answer.")
        if self.files.records_removed:
            text += f" Removed from {self.files.files_rewritten} training files too."
        return text + (" A model already trained keeps what it learned until the next retrain,"
                       " which no longer uses your text.")


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


async def forget_everywhere(cfg: Config, store: Store, user_id: int) -> ForgetReport:
    """The database first (the source of every export), then the files made from it."""
    forgotten = await store.forget_user(user_id)
    files = forget_files(forgotten.erasure, cfg.path(cfg.training.work_dir),
                         cfg.path(cfg.training.registry_dir))
    log.info("forgot user %s: %s; files: %s", user_id, forgotten.counts, files)
    return ForgetReport(forgotten, files)


def scrub_jsonl(path: Path, erasure: Erasure) -> int:
    """Apply `erasure` to a JSONL export (records dropped or rewritten); returns how many changed."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept, changed = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            kept.append(line)  # not ours to judge; leave it
            continue
        if erasure.drops(record):
            changed += 1
            continue
        cleaned = erasure.apply(record)
        if cleaned != record:
            changed += 1
            line = json.dumps(cleaned, ensure_ascii=False) + "\n"
        kept.append(line)
    if changed:
        write_text_atomic(path, "".join(kept))
    return changed


def scrub_json(path: Path, erasure: Erasure) -> int:
    """Apply `erasure` to a JSON file (a manifest, a gate report); 1 if it changed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("forget: %s is not valid JSON; left as it is", path)
        return 0
    cleaned = erasure.apply(data)
    if cleaned == data:
        return 0
    write_json_atomic(path, cleaned)
    return 1


def forget_files(erasure: Erasure, work_dir: Path, registry_dir: Path) -> FilesForgotten:
    """Apply the store's erasure to run exports and registry manifests / gate reports."""
    files = removed = 0
    if not erasure.correction_ids and not erasure.texts:
        return FilesForgotten(0, 0)
    for path in sorted(work_dir.glob(RUN_EXPORT_GLOB)) if work_dir.is_dir() else []:
        n = scrub_jsonl(path, erasure)
        files, removed = files + bool(n), removed + n
    for name in REGISTRY_JSON:
        for path in sorted(registry_dir.glob(f"*/{name}")) if registry_dir.is_dir() else []:
            n = scrub_json(path, erasure)
            files, removed = files + n, removed + n
    return FilesForgotten(files, removed)
