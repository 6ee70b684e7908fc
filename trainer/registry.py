"""The adapter registry: versioned PEFT adapter directories, promotion and rollback.

Layout of `training.registry_dir`:

    v0001/                 a standard PEFT adapter dir (adapter_config.json,
      adapter_model.safetensors)  loads unchanged in transformers / peft / vLLM
      manifest.json        version, parent, stage, base, data hash, sample counts,
                           hyperparameters, metrics, gate, status, created time
    v0002/ ...
    PROMOTED               the promoted version's name (replaced atomically); the truth
    history.jsonl          promotions and rollbacks, one JSON object per line
    .staging-<pid>-<n>/    a version being written; never listed, never promotable

A version appears only by renaming a complete staging dir, so a run killed at
any moment leaves nothing half-written that could be promoted, and PROMOTED is
only ever swapped with os.replace. PROMOTED is written before history.jsonl; a
run killed between the two is repaired by `check()` (`python -m trainer check`, and
every trainer run that trains or gates, first) or by the next writer, which append the
missing event. Directories are created 0700 (adapters are trained on users' words).
This module imports no torch: the bot uses it, and only its read API (versions, get,
promoted, pointer, history, promotion_stack, live_since, describe, problems): the bot
never writes here, it reports what `problems()` finds and names `python -m trainer check`.

Rollback history is a stack: a promotion pushes, a plain rollback pops, and an
explicit `rollback --to V` pushes V on top of the version it replaced (so a plain
rollback afterwards returns there).

status in a manifest: trainer.protocol.VersionStatus (candidate, rejected, promoted, superseded,
rolled_back); `promoted_at` stays on every version that was ever live. A history event's "action"
is the command that wrote it (Command.PROMOTE or Command.ROLLBACK).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

from trainer.protocol import Command, VersionStatus, now_iso

VERSION_RE = re.compile(r"^v(\d{4,})$")
MANIFEST = "manifest.json"
PROMOTED_FILE = "PROMOTED"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TMP_SUFFIX = ".tmp"
DIR_MODE = 0o700
FILE_MODE = 0o600


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; str() says why in words."""


def format_version(n: int) -> str:
    return f"v{n:04d}"


def _tmp_path(path: Path) -> Path:
    # The pid in the name lets `check()` tell a dead writer's leftovers from a live one's.
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, fsync, and os.replace it into place."""
    tmp = _tmp_path(path)
    try:
        # Owner only: manifests and gate reports quote what users wrote (their corrections).
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json_cache(path: Path) -> dict:
    """A cache file's JSON object; {} when it is missing, unreadable or not an object (the
    caller recomputes what it holds, so a damaged cache costs time, never a run)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: int) -> bool:
    """Whether the writer with this pid may still write. A zombie (dead, not yet reaped: a
    trainer whose bot was killed waits for init, which in a container may never come) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # not Linux, or gone meanwhile: kill() said it was there
        return True
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X")


class Registry:
    """Versions of one adapter lineage on disk (see module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)

    @classmethod
    def from_config(cls, cfg) -> "Registry":
        """The registry `training.registry_dir` names (relative to the config's directory)."""
        return cls(cfg.path(cfg.training.registry_dir))

    def _mkdir_root(self) -> None:
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
        for p in reversed(missing):  # the data directory too, when the registry creates it
            p.mkdir(exist_ok=True, mode=DIR_MODE)

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
        """The manifest of `version`; RegistryError (naming the file) if it is missing or unreadable."""
        f = self.path(version or "") / MANIFEST
        if not VERSION_RE.match(version or "") or not f.is_file():
            known = ", ".join(self.versions()) or "none yet"
            raise RegistryError(f"no adapter version {version!r} in {self.root} (versions: {known})")
        try:
            manifest = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{f}: the manifest of {version} cannot be read ({exc}); restore the file "
                                f"or move {self.path(version)} out of the registry") from None
        if not isinstance(manifest, dict):
            raise RegistryError(f"{f}: the manifest of {version} is not a JSON object")
        return manifest

    def promoted(self) -> Optional[str]:
        """The promoted version, None if nothing was ever promoted. A PROMOTED file naming a
        version that is not there is an error (never read as "nothing promoted": that would
        rebuild the identity from scratch)."""
        f = self.root / PROMOTED_FILE
        try:
            v = f.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{f} cannot be read ({exc})") from None
        if not v:
            return None
        if v not in self.versions():
            known = ", ".join(self.versions()) or "none"
            raise RegistryError(f"{f} names {v!r}, but {self.root} has no complete version {v!r} "
                                f"(versions: {known}); restore it, or roll back with "
                                f"`python -m trainer rollback --to VERSION`")
        return v

    def pointer(self) -> Optional[str]:
        """What PROMOTED says, whether or not that version exists (None: nothing promoted)."""
        try:
            return (self.root / PROMOTED_FILE).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.root / PROMOTED_FILE} cannot be read ({exc})") from None

    def latest(self, stage: Optional[str] = None) -> Optional[str]:
        for v in reversed(self.versions()):
            try:
                if stage is None or self.get(v).get("stage") == stage:
                    return v
            except RegistryError:
                continue  # a broken manifest is reported by list/check, not here
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
        """Versions that have been live, the live one last: what a plain rollback walks back.

        A promotion or an explicit `rollback --to V` pushes (V moves to the top); a plain
        rollback pops the top."""
        stack: list[str] = []
        for e in self.history():
            v = e.get("version")
            if not v:
                continue
            if e.get("action") == Command.ROLLBACK and not e.get("explicit") and e.get("from") in stack:
                stack.remove(e["from"])
            if v in stack:
                stack.remove(v)
            stack.append(v)
        current = self.promoted()
        if current and (not stack or stack[-1] != current):
            stack = [v for v in stack if v != current] + [current]
        existing = set(self.versions())
        return [v for v in stack if v in existing]

    def live_since(self) -> Optional[str]:
        """When the promoted version became live (its last promotion or rollback event)."""
        current = self.promoted()
        for e in reversed(self.history()):
            if e.get("version") == current:
                return e.get("at")
        return None

    def problems(self) -> list[str]:
        """What `check()` would repair, in words, changing nothing (the bot's start and /status:
        a reader never repairs). RegistryError when PROMOTED names a missing version, as
        `promoted()`; [] when all is well."""
        if not self.root.exists():
            return []
        leftovers = [p.name for p in self._stale_staging()]
        leftovers += [str(p.relative_to(self.root)) for p in self._stale_temp_files()]
        found = [f"{name} was left by a writer that died" for name in leftovers]
        current = self.promoted()
        if current:
            if self._history_lacks(current):
                found.append(f"history.jsonl does not record that {current} is promoted")
            status = self.get(current).get("status")
            if status != VersionStatus.PROMOTED:
                found.append(f"{current}/{MANIFEST} says {status}, but {current} is promoted")
            found += [f"{v}/{MANIFEST} still says promoted ({current} is)" for v in self._promoted_besides(current)]
        return found

    def check(self) -> list[str]:
        """Check and repair (`python -m trainer check`): PROMOTED names a complete version (else
        RegistryError), history agrees with PROMOTED (a missing event, from a kill mid-promote, is
        appended), only the promoted version's manifest says so, dead writers' temp files and
        staging dirs are removed. Returns what was repaired (what `problems()` said, done)."""
        if not self.root.exists():
            return []
        repaired = [f"removed {name}" for name in self.clean_stale_staging() + self.clean_stale_temp_files()]
        current = self.promoted()  # raises if it names a missing version
        if current:
            with self.locked():
                if self._repair_history(current):
                    repaired.append(f"history.jsonl: recorded that {current} is promoted")
                manifest = self.get(current)
                if manifest.get("status") != VersionStatus.PROMOTED:
                    write_json_atomic(self.path(current) / MANIFEST, {
                        **manifest, "status": VersionStatus.PROMOTED,
                        "promoted_at": manifest.get("promoted_at") or now_iso()})
                    repaired.append(f"{current}/{MANIFEST}: status set to promoted")
                repaired += [f"{v}/{MANIFEST}: status set to superseded" for v in self._supersede_all_but(current)]
        return repaired

    # ---- writing --------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (trainer runs, bot admin commands) on one lock file."""
        self._mkdir_root()
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
        self._mkdir_root()
        self.clean_stale_staging()
        self.clean_stale_temp_files()
        n = 0
        while True:
            p = self.root / f"{STAGING_PREFIX}{os.getpid()}-{n}"
            try:
                p.mkdir(mode=DIR_MODE)
                return p
            except FileExistsError:
                n += 1

    def _stale_staging(self) -> list[Path]:
        """Staging dirs of writers that died."""
        out = []
        for p in self.root.glob(STAGING_PREFIX + "*"):
            pid = p.name[len(STAGING_PREFIX):].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                out.append(p)
        return out

    def _stale_temp_files(self) -> list[Path]:
        """`.NAME.<pid>.tmp` files of writers that died mid-write, in the root and in versions."""
        out = []
        for p in [*self.root.glob(f".*{TMP_SUFFIX}"), *self.root.glob(f"v*/.*{TMP_SUFFIX}")]:
            pid = p.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                out.append(p)
        return out

    def clean_stale_staging(self) -> list[str]:
        removed = []
        for p in self._stale_staging():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        return removed

    def clean_stale_temp_files(self) -> list[str]:
        removed = []
        for p in self._stale_temp_files():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(str(p.relative_to(self.root)))
        return removed

    def import_adapter(self, source: str | os.PathLike, manifest: dict) -> str:
        """Register an outside PEFT LoRA adapter directory (e.g. trained by ms-swift) as a new
        candidate version; its files are copied, the source is left as it is."""
        src = Path(source)
        config_file = src / "adapter_config.json"
        if not src.is_dir():
            raise RegistryError(f"{src}: not a directory (expected a PEFT adapter directory)")
        missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
        if missing:
            raise RegistryError(f"{src}: not a PEFT adapter directory, missing {', '.join(missing)} "
                                "(save it with save_pretrained(..., safe_serialization=True))")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{config_file}: cannot be read ({exc})") from None
        if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
            raise RegistryError(f"{config_file}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                                "only LoRA adapters can be served")
        staging = self.new_staging_dir()
        try:
            for f in ADAPTER_FILES:
                shutil.copyfile(src / f, staging / f)
                os.chmod(staging / f, FILE_MODE)
            version = self.commit(staging, {
                "stage": "imported", "parent": None, "source": str(src.resolve()),
                "source_base": config.get("base_model_name_or_path"),
                "lora": {k: config.get(k) for k in ("r", "lora_alpha", "target_modules")},
                "corrections": [], "metrics": {}, **manifest,
            })
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def commit(self, staging: Path, manifest: dict) -> str:
        """Turn a complete staging dir into the next version; returns its name."""
        missing = [f for f in ADAPTER_FILES if not (staging / f).is_file()]
        if missing:
            raise RegistryError(f"{staging}: adapter incomplete, missing {', '.join(missing)}")
        with self.locked():
            numbers = [int(v[1:]) for v in self.versions()]
            version = format_version(max(numbers, default=0) + 1)
            manifest = {**manifest, "version": version, "status": VersionStatus.CANDIDATE, "created_at": now_iso()}
            write_json_atomic(staging / MANIFEST, manifest)
            os.rename(staging, self.path(version))
        return version

    def update(self, version: str, **fields) -> dict:
        """Merge `fields` into a version's manifest (atomically)."""
        with self.locked():
            manifest = {**self.get(version), **fields}
            write_json_atomic(self.path(version) / MANIFEST, manifest)
        return manifest

    def _append_history(self, event: dict) -> None:
        with open(self.root / HISTORY_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _history_lacks(self, current: str) -> bool:
        """Whether history.jsonl's last event is not `current`'s (a kill between PROMOTED and it)."""
        history = self.history()
        return (history[-1].get("version") if history else None) != current

    def _repair_history(self, current: str) -> bool:
        """Append the event a kill between PROMOTED and history.jsonl lost (caller holds the lock)."""
        if not self._history_lacks(current):
            return False
        history = self.history()
        last = history[-1].get("version") if history else None
        self._append_history({"action": Command.PROMOTE, "version": current, "from": last, "at": now_iso(),
                              "forced": False, "repaired": True})
        return True

    def _set_pointer(self, version: str, action: str, previous: Optional[str], forced: bool,
                     explicit: bool = False) -> None:
        # PROMOTED first: it is what serving reads; history is repaired from it if we die here.
        if previous:
            self._repair_history(previous)
        write_text_atomic(self.root / PROMOTED_FILE, version + "\n")
        event = {"action": action, "version": version, "from": previous, "at": now_iso(), "forced": forced}
        if action == Command.ROLLBACK:
            event["explicit"] = explicit
        self._append_history(event)

    def _promoted_besides(self, live: str) -> list[str]:
        """Versions other than `live` whose manifest still says "promoted"."""
        out = []
        for v in self.versions():
            if v == live:
                continue
            try:
                m = self.get(v)
            except RegistryError:
                continue  # a broken version is reported by list, not rewritten here
            if m.get("status") == VersionStatus.PROMOTED:
                out.append(v)
        return out

    def _supersede_all_but(self, live: str) -> list[str]:
        """Versions other than `live` whose manifest still says "promoted" now say "superseded"
        (caller holds the lock); returns them."""
        changed = self._promoted_besides(live)
        for v in changed:
            write_json_atomic(self.path(v) / MANIFEST, {**self.get(v), "status": VersionStatus.SUPERSEDED})
        return changed

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
            previous = self.pointer()  # may name a missing version: promoting repairs that
            self._set_pointer(version, Command.PROMOTE, previous, force)
            fields = {**self.get(version), "status": VersionStatus.PROMOTED, "promoted_at": now_iso()}
            write_json_atomic(self.path(version) / MANIFEST, fields)
            self._supersede_all_but(version)
        return version

    def rollback(self, to: Optional[str] = None) -> str:
        """Re-point to `to` or, by default, the version that was live before the current one."""
        with self.locked():
            current = self.pointer() if to is not None else self.promoted()  # --to repairs a missing one
            if to is None:
                stack = self.promotion_stack()
                earlier = [v for v in stack if v != current]
                if not earlier:
                    raise RegistryError("nothing to roll back to: no earlier promoted version")
                to = earlier[-1]
                explicit = False
            else:
                explicit = True
            self.get(to)  # exists?
            if to == current:
                raise RegistryError(f"{to} is already the promoted version")
            self._set_pointer(to, Command.ROLLBACK, current, False, explicit=explicit)
            if current and current in self.versions():
                write_json_atomic(self.path(current) / MANIFEST,
                                  {**self.get(current), "status": VersionStatus.ROLLED_BACK})
            write_json_atomic(self.path(to) / MANIFEST, {**self.get(to), "status": VersionStatus.PROMOTED})
        return to

    def describe(self) -> list[dict]:
        """One summary row per version (for `list`)."""
        live = self.promoted()
        rows = []
        for v in self.versions():
            try:
                m = self.get(v)
            except RegistryError as exc:  # one broken version must not hide the others
                rows.append({"version": v, "stage": None, "parent": None, "status": VersionStatus.BROKEN,
                             "gate_passed": None, "promoted": v == live, "created_at": None,
                             "samples": None, "error": str(exc)})
                continue
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
