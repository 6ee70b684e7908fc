"""The adapter registry: versioned PEFT adapter directories, promotion and rollback.

Layout of `training.registry_dir`:

    v0001/                 a standard PEFT adapter dir (adapter_config.json,
      adapter_model.safetensors)  loads unchanged in transformers / peft / vLLM
      manifest.json        version, parent, stage, base, data hash, sample counts,
                           hyperparameters, metrics, gate, status, created time
    v0002/ ...
    PROMOTED               the promoted version's name (replaced atomically)
    history.jsonl          promotions and rollbacks, one JSON object per line
    .staging-<pid>-<n>/    a version being written; never listed, never promotable

A version appears only by renaming a complete staging dir, so a run killed at
any moment leaves nothing half-written that could be promoted, and PROMOTED is
only ever swapped with os.replace. This module imports no torch: the bot uses it.

status in a manifest: "candidate" (new), "rejected" (gate failed), "promoted"
(promoted at least once), "rolled_back" (an admin rolled away from it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

VERSION_RE = re.compile(r"^v(\d{4,})$")
MANIFEST = "manifest.json"
PROMOTED_FILE = "PROMOTED"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; str() says why in words."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def format_version(n: int) -> str:
    return f"v{n:04d}"


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temp file beside `path`, fsync, and os.replace it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    """Versions of one adapter lineage on disk (see module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)

    # ---- reading --------------------------------------------------------

    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p.name for p in self.root.iterdir()
            if p.is_dir() and VERSION_RE.match(p.name) and (p / MANIFEST).is_file()
        ]
        return sorted(found, key=lambda v: int(v[1:]))

    def path(self, version: str) -> Path:
        return self.root / version

    def get(self, version: str) -> dict:
        """The manifest of `version`; RegistryError if there is no such version."""
        f = self.path(version) / MANIFEST
        if not VERSION_RE.match(version or "") or not f.is_file():
            known = ", ".join(self.versions()) or "none yet"
            raise RegistryError(f"no adapter version {version!r} in {self.root} (versions: {known})")
        return json.loads(f.read_text(encoding="utf-8"))

    def promoted(self) -> Optional[str]:
        f = self.root / PROMOTED_FILE
        try:
            v = f.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return v if v in self.versions() else None

    def latest(self, stage: Optional[str] = None) -> Optional[str]:
        for v in reversed(self.versions()):
            if stage is None or self.get(v).get("stage") == stage:
                return v
        return None

    def history(self) -> list[dict]:
        """Promotion events, oldest first: {"action", "version", "from", "at", "forced"}."""
        f = self.root / HISTORY_FILE
        if not f.exists():
            return []
        out = []
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a crash mid-append: ignore it
        return out

    def promotion_stack(self) -> list[str]:
        """Versions that have been live, most recent last; rolling back pops the top."""
        stack: list[str] = []
        for e in self.history():
            v = e.get("version")
            if e.get("action") == "rollback" and e.get("from") in stack:
                stack.remove(e["from"])
            if v in stack:
                stack.remove(v)
            stack.append(v)
        current = self.promoted()
        if current and (not stack or stack[-1] != current):
            stack = [v for v in stack if v != current] + [current]
        existing = set(self.versions())
        return [v for v in stack if v in existing]

    # ---- writing --------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (trainer runs, bot admin commands) on one lock file."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as fh:
            try:
                import fcntl
            except ImportError:  # not POSIX: single-writer use only
                yield
                return
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def new_staging_dir(self) -> Path:
        """A fresh private dir to write a version into; stale ones of dead runs are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale_staging()
        n = 0
        while True:
            p = self.root / f"{STAGING_PREFIX}{os.getpid()}-{n}"
            try:
                p.mkdir()
                return p
            except FileExistsError:
                n += 1

    def clean_stale_staging(self) -> list[str]:
        removed = []
        for p in self.root.glob(STAGING_PREFIX + "*"):
            pid = p.name[len(STAGING_PREFIX):].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def commit(self, staging: Path, manifest: dict) -> str:
        """Turn a complete staging dir into the next version; returns its name."""
        missing = [f for f in ADAPTER_FILES if not (staging / f).is_file()]
        if missing:
            raise RegistryError(f"{staging}: adapter incomplete, missing {', '.join(missing)}")
        with self.locked():
            numbers = [int(v[1:]) for v in self.versions()]
            version = format_version(max(numbers, default=0) + 1)
            manifest = {**manifest, "version": version, "status": "candidate", "created_at": now_iso()}
            write_json_atomic(staging / MANIFEST, manifest)
            os.rename(staging, self.path(version))
        return version

    def update(self, version: str, **fields) -> dict:
        """Merge `fields` into a version's manifest (atomically)."""
        with self.locked():
            manifest = {**self.get(version), **fields}
            write_json_atomic(self.path(version) / MANIFEST, manifest)
        return manifest

    def _set_pointer(self, version: str, action: str, previous: Optional[str], forced: bool) -> None:
        event = {"action": action, "version": version, "from": previous, "at": now_iso(), "forced": forced}
        with open(self.root / HISTORY_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp = self.root / f".{PROMOTED_FILE}.{os.getpid()}.tmp"
        tmp.write_text(version + "\n", encoding="utf-8")
        os.replace(tmp, self.root / PROMOTED_FILE)

    def promote(self, version: str, force: bool = False) -> str:
        """Make `version` the live adapter; only a gate-passed one unless forced."""
        manifest = self.get(version)
        gate = manifest.get("gate") or {}
        if not force and gate.get("passed") is not True:
            why = "its gate failed" if gate else "it has not been evaluated"
            raise RegistryError(
                f"{version} cannot be promoted: {why} (run `python -m trainer eval --version {version}`, "
                "or promote with --force)"
            )
        with self.locked():
            previous = self.promoted()
            self._set_pointer(version, "promote", previous, force)
            fields = {**self.get(version), "status": "promoted", "promoted_at": now_iso()}
            write_json_atomic(self.path(version) / MANIFEST, fields)
        return version

    def rollback(self, to: Optional[str] = None) -> str:
        """Re-point to `to` or, by default, the version that was live before the current one."""
        with self.locked():
            current = self.promoted()
            if to is None:
                stack = self.promotion_stack()
                earlier = [v for v in stack if v != current]
                if not earlier:
                    raise RegistryError("nothing to roll back to: no earlier promoted version")
                to = earlier[-1]
            self.get(to)  # exists?
            if to == current:
                raise RegistryError(f"{to} is already the promoted version")
            self._set_pointer(to, "rollback", current, False)
            if current:
                write_json_atomic(self.path(current) / MANIFEST, {**self.get(current), "status": "rolled_back"})
            write_json_atomic(self.path(to) / MANIFEST, {**self.get(to), "status": "promoted"})
        return to

    def describe(self) -> list[dict]:
        """One summary row per version (for `list`)."""
        live = self.promoted()
        rows = []
        for v in self.versions():
            m = self.get(v)
            gate = m.get("gate") or {}
            rows.append({
                "version": v,
                "stage": m.get("stage"),
                "parent": m.get("parent"),
                "status": m.get("status"),
                "gate_passed": gate.get("passed"),
                "promoted": v == live,
                "created_at": m.get("created_at"),
                "samples": (m.get("samples") or {}).get("total"),
            })
        return rows
