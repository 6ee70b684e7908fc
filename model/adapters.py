"""LoRA adapter bookkeeping: public names, versions, and who is using which.

Hot-swap without failing anyone works like this. Every load gets a fresh
internal peft adapter name (`lc1`, `lc2`, ...); the public name (what requests
put in `model`) maps to the newest one. A request resolves and *holds* the
internal name when it is admitted, so it finishes on the version it started
with, while requests arriving after the load call returned get the new one.
An old version is deleted from the model when its last request releases it.

`check_adapter_dir` validates an adapter directory against the base before
anything touches the model, so a bad path leaves the old adapter serving.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from model.errors import APIError

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_KEY_PREFIX = "base_model.model."


@dataclass
class AdapterVersion:
    name: str  # public name
    internal: str  # peft adapter name inside the model
    path: str
    refs: int = 0  # requests holding this version
    retired: bool = False  # replaced or unloaded; delete when refs reaches 0


class AdapterInUse(Exception):
    pass


class AdapterTable:
    """Thread-safe map public name -> current version, with reference counts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._current: dict[str, AdapterVersion] = {}
        self._versions: dict[str, AdapterVersion] = {}
        self._counter = 0

    def new_internal_name(self) -> str:
        with self._lock:
            self._counter += 1
            return f"lc{self._counter}"  # no dots: peft keys adapters by module-dict name

    def paths(self) -> dict[str, str]:
        with self._lock:
            return {n: v.path for n, v in self._current.items()}

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._current

    def acquire(self, name: str) -> Optional[AdapterVersion]:
        """Hold the current version of `name` for one request (None if unknown)."""
        with self._lock:
            version = self._current.get(name)
            if version is not None:
                version.refs += 1
            return version

    def release(self, version: AdapterVersion) -> bool:
        """Drop one hold; True when the version is retired and now unused (delete it)."""
        with self._lock:
            version.refs -= 1
            return self._reap(version)

    def _reap(self, version: AdapterVersion) -> bool:
        if version.retired and version.refs <= 0:
            self._versions.pop(version.internal, None)
            return True
        return False

    def publish(self, name: str, internal: str, path: str) -> Optional[str]:
        """Point `name` at a freshly loaded version; returns an old internal name to delete now."""
        with self._lock:
            new = AdapterVersion(name, internal, path)
            self._versions[internal] = new
            old = self._current.get(name)
            self._current[name] = new
            if old is None:
                return None
            old.retired = True
            return old.internal if self._reap(old) else None

    def unload(self, name: str) -> str:
        """Remove `name`; returns the internal name to delete. Refuses while requests use it."""
        with self._lock:
            version = self._current.get(name)
            if version is None:
                raise KeyError(name)
            if version.refs > 0:
                raise AdapterInUse(f"adapter '{name}' is in use by {version.refs} running request(s)")
            del self._current[name]
            version.retired = True
            self._reap(version)
            return version.internal

    def holds(self) -> dict[str, int]:
        """Public name -> requests holding its current version (for /health)."""
        with self._lock:
            return {n: v.refs for n, v in self._current.items()}


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) for every Linear of the base model."""
    import torch

    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_adapter_dir(path: str, shapes: dict[str, tuple[int, int]]) -> dict:
    """Validate a PEFT LoRA adapter dir against the base; returns its config. 400 otherwise."""
    where = Path(path)
    if not where.is_dir():
        raise APIError(400, f"adapter path {path!r} is not a directory", param="lora_path", code="invalid_adapter")
    cfg_file = where / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise APIError(400, f"{path!r} is not a PEFT adapter: {ADAPTER_CONFIG} is missing",
                       param="lora_path", code="invalid_adapter")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise APIError(400, f"{cfg_file}: not valid JSON ({exc})", param="lora_path", code="invalid_adapter")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise APIError(400, f"{path!r} is not a LoRA adapter (peft_type={kind!r})",
                       param="lora_path", code="invalid_adapter")
    weights = next((where / f for f in WEIGHT_FILES if (where / f).is_file()), None)
    if weights is None:
        raise APIError(400, f"{path!r} has no adapter weights ({' or '.join(WEIGHT_FILES)})",
                       param="lora_path", code="invalid_adapter")
    try:
        tensors = _tensor_shapes(weights)
    except Exception as exc:  # corrupt file: any reader error is the user's file
        raise APIError(400, f"{weights}: cannot read adapter weights ({exc})", param="lora_path", code="invalid_adapter")
    _check_shapes(path, tensors, shapes)
    return config


def _check_shapes(path: str, tensors: dict, shapes: dict[str, tuple[int, int]]) -> None:
    for key, shape in tensors.items():
        for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key:
                continue
            module = key.split(part)[0]
            module = module[len(PEFT_KEY_PREFIX):] if module.startswith(PEFT_KEY_PREFIX) else module
            if module not in shapes:
                raise APIError(400, f"adapter {path!r} is incompatible with the base model: it targets "
                               f"'{module}', which the base does not have", param="lora_path",
                               code="incompatible_adapter")
            expected = shapes[module][0] if part == ".lora_A." else shapes[module][1]
            if len(shape) != 2 or shape[dim] != expected:
                side = "input" if part == ".lora_A." else "output"
                raise APIError(400, f"adapter {path!r} is incompatible with the base model: '{module}' has "
                               f"{side} size {expected}, the adapter's {key} has shape {list(shape)}",
                               param="lora_path", code="incompatible_adapter")
