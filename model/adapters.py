"""LoRA adapter bookkeeping: public names, versions, and who is using which.

Hot-swap without failing anyone works like this. Every load gets a fresh
internal peft adapter name (`lc1`, `lc2`, ...); the public name (what requests
put in `model`) maps to the newest one. A request resolves and *holds* the
internal name when it is admitted, so it finishes on the version it started
with, while requests arriving after the load call returned get the new one.
An old version is deleted from the model when its last request releases it.

`read_adapter` reads an adapter directory into memory and validates it against
the base (shapes, finite weights) before anything touches the model, so a bad
or half-written adapter leaves the old one serving; the engine then loads the
in-memory copy, never a memory-mapped file (a file rewritten under a mapping
kills the process with SIGBUS). `within_roots` limits which directories may be
loaded at all.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    digest: str = ""  # sha256 of the adapter's files as read (AdapterFiles.digest); "" if not known
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

    def publish(self, name: str, internal: str, path: str, digest: str = "") -> Optional[str]:
        """Point `name` at a freshly loaded version; returns an old internal name to delete now."""
        with self._lock:
            new = AdapterVersion(name, internal, path, digest)
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


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter read fully into memory: nothing is served from a file that can change."""

    path: str
    config: dict  # adapter_config.json
    weights: dict  # tensor name -> torch.Tensor (a private copy, never memory-mapped)
    digest: str = ""  # sha256 over adapter_config.json's and the weight file's bytes: the version's identity


def _bad(message: str) -> APIError:
    return APIError(400, message, param="lora_path")


def _parse_weights(weights: Path, data: bytes) -> dict:
    """The state dict from bytes in memory: a file rewritten meanwhile is an error, not a SIGBUS."""
    import io

    import torch

    if weights.suffix == ".safetensors":
        from safetensors.torch import load

        return load(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# adapter_config.json keys that replace whole modules (lm_head, embeddings) rather than add LoRA
# updates: peft serves them only by swapping the module for every row, which breaks mixed batches.
UNSUPPORTED_CONFIG = ("modules_to_save", "trainable_token_indices")


def read_adapter(path: str, shapes: Optional[dict[str, tuple[int, int]]]) -> AdapterFiles:
    """Read and validate a PEFT LoRA adapter dir against the base; 400 naming the problem otherwise."""
    import torch

    where = Path(path)
    if not where.is_dir():
        raise _bad(f"adapter path {path!r} is not a directory")
    cfg_file = where / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise _bad(f"{path!r} is not a PEFT adapter: {ADAPTER_CONFIG} is missing")
    try:
        config_bytes = cfg_file.read_bytes()
        config = json.loads(config_bytes.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise _bad(f"{cfg_file}: not valid JSON ({exc})") from None
    except RecursionError:
        raise _bad(f"{cfg_file}: JSON nested too deep to be an adapter config") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise _bad(f"{path!r} is not a LoRA adapter (peft_type={kind!r})")
    unsupported = [k for k in UNSUPPORTED_CONFIG if config.get(k)]
    if unsupported:
        raise _bad(f"{path!r} uses {', '.join(unsupported)} (whole modules trained beside LoRA), which this worker "
                   "cannot serve per request in a mixed batch; train without it, or serve the adapter with vLLM")
    weights_file = next((where / f for f in WEIGHT_FILES if (where / f).is_file()), None)
    if weights_file is None:
        raise _bad(f"{path!r} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    try:
        data = weights_file.read_bytes()
        weights = _parse_weights(weights_file, data)
    except Exception as exc:  # truncated, rewritten or corrupt: any reader error is the file's
        raise _bad(f"{weights_file}: cannot read adapter weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(weights, dict) or not weights or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise _bad(f"{weights_file}: not a state dict of tensors")
    bad = next((k for k, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise _bad(f"adapter {path!r} has non-finite weights (NaN or infinity in {bad}); it would answer nothing")
    if shapes is not None:
        _check_shapes(path, {k: tuple(t.shape) for k, t in weights.items()}, shapes)
    digest = hashlib.sha256(config_bytes + b"\0" + data).hexdigest()
    return AdapterFiles(path, config, weights, digest)


def attach(model, internal: str, files: AdapterFiles):
    """Add the in-memory adapter to `model` (wrapping it in a PeftModel the first time); returns the model.

    What `PeftModel.load_adapter` does, minus its file reading: config from the
    parsed adapter_config.json, weights from the private state dict.
    """
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    config = PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**files.config))
    config.inference_mode = True
    wrapped = isinstance(model, PeftModel)
    if wrapped:
        model.add_adapter(internal, config)
    else:
        model = PeftModel(model, config, adapter_name=internal)
    try:
        result = set_peft_model_state_dict(model, files.weights, adapter_name=internal)
        missing = [k for k in result.missing_keys if internal in k and "lora_" in k]
        if missing:
            raise ValueError(f"adapter weights are missing {len(missing)} tensor(s), e.g. {missing[0]}")
        _weights_for_dora(model, internal)
    except BaseException:
        # A refused load leaves the model exactly as it was: no half-added layers.
        if wrapped:
            model.delete_adapter(internal)
        else:
            model.unload()
        raise
    model.eval()
    return model


def _weights_for_dora(model, internal: str) -> None:
    """DoRA reads its base layer's weight on every forward; a CPU layer packed for its GEMM
    (model.packed_linear) keeps only a stub there, so each one DoRA wraps gets its values back."""
    from model.packed_linear import PackedLinear

    for module in model.modules():
        if getattr(module, "use_dora", {}).get(internal):
            base = module.get_base_layer()
            if isinstance(base, PackedLinear):
                base.restore_weight()


def check_adapter_dir(path: str, shapes: dict[str, tuple[int, int]]) -> dict:
    """Validate an adapter dir (see `read_adapter`); returns its config."""
    return read_adapter(path, shapes).config


def within_roots(path: str, roots: list[Path]) -> Optional[Path]:
    """`path` resolved, if it lies inside one of `roots`; None otherwise.

    Decided on the resolved name alone, before anything is read, so the answer
    (and the error a caller sees) is the same whether the path exists or not.
    """
    try:
        resolved = Path(os.path.expanduser(path)).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    return None


def _check_shapes(path: str, tensors: dict, shapes: dict[str, tuple[int, int]]) -> None:
    for key, shape in tensors.items():
        for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key:
                continue
            module = key.split(part)[0]
            module = module[len(PEFT_KEY_PREFIX):] if module.startswith(PEFT_KEY_PREFIX) else module
            if module not in shapes:
                raise _bad(f"adapter {path!r} is incompatible with the base model: it targets "
                           f"'{module}', which the base does not have")
            expected = shapes[module][0] if part == ".lora_A." else shapes[module][1]
            if len(shape) != 2 or shape[dim] != expected:
                side = "input" if part == ".lora_A." else "output"
                raise _bad(f"adapter {path!r} is incompatible with the base model: '{module}' has "
                           f"{side} size {expected}, the adapter's {key} has shape {list(shape)}")
