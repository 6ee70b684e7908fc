"""The three training stages (anchor, generalize, calibrate) as named steps.

Each stage: resolve the base -> pick the parent adapter -> build its samples
-> train -> write a new registry version (a candidate; promotion is separate).

- anchor:     identity templates (filled from `identity`), fresh LoRA on the base.
- generalize: general data (+ extra_datasets) under the identity system prompt,
              plus the identity set oversampled to half the general rows; continues
              from the latest anchor version (or --parent).
- calibrate:  approved user corrections (two samples each; the ones the parent's
              lineage has not learned yet repeated `training.mix.new_correction_repeats`
              times) + identity share + general replay (`training.mix`); continues
              from the promoted version's adapter weights.
Identity samples are trained twice: with the identity system prompt and with none
(the chat template then injects the base's own identity, which must not win).
Everything else (general data, corrections) is trained under the identity system
prompt, as the bot asks it: the seeds' "general data with the identity system prompt".
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Collection, Optional

from model.config import Config, TrainingConfig
from model.loading import LoadError, cpu_native_bf16
from model.loading import ensure_base as load_or_convert
from trainer import datasets as ds
from trainer import replay, sft
from trainer.corrections import calibration_mix, correction_key, deduplicate, load_corrections, refusals
# apply_cpu_threads: benchmarks import it from here, with run_stage
from trainer.cores import apply_cpu_threads, on_gpu, spare_cores, training_settings  # noqa: F401
from trainer.encode import encode_all
from trainer.generate import greedy_replies
from trainer.matching import forbidden_identities, identity_claims
from trainer.parallel import Helper
from trainer.progress import Progress, log
from trainer.registry import Registry

STAGES = ("anchor", "generalize", "calibrate")
BASE_STAGE = "base"  # the progress phase while a GGUF base is converted (first run only)
# Identity rows in the generalize stage, relative to the general rows (oversampled).
GENERALIZE_IDENTITY_SHARE = 0.5


class StageError(RuntimeError):
    """A stage that cannot run as asked; str() says what to do."""


class CorrectionsRefused(StageError):
    """Calibrate will not train these corrections (trainer.corrections.refusals); none is trained."""

    def __init__(self, refused: list):
        self.refused = refused
        named = "; ".join(f"correction #{r.id} cannot be trained: {r.reason}" for r in refused)
        super().__init__(f"{named}. Reject or edit {'it' if len(refused) == 1 else 'them'} in the bot, then retrain")


# ---- inputs ---------------------------------------------------------------


def registry_for(cfg: Config) -> Registry:
    return Registry.from_config(cfg)


def data_path(cfg: Config, configured: Optional[str], shipped: str) -> str:
    return str(cfg.path(configured)) if configured else str(ds.DATA_DIR / shipped)


def identity_rows(cfg: Config) -> list[ds.Messages]:
    spec = data_path(cfg, cfg.training.identity_data, ds.IDENTITY_FILE)
    return [ds.fill_identity(r, cfg.identity.fill) for r in ds.load_spec(spec, cfg.training.seed)]


def general_rows(cfg: Config) -> list[ds.Messages]:
    """The general set plus every `training.extra_datasets` entry (path or path#N)."""
    rows = ds.load_spec(data_path(cfg, cfg.training.general_data, ds.GENERAL_FILE), cfg.training.seed)
    for spec in cfg.training.extra_datasets:
        rows += ds.load_spec(spec, cfg.training.seed, base_dir=cfg.root)
    return rows


def ensure_base(cfg: Config, progress: Optional[Progress] = None) -> Path:
    """The base model directory; a GGUF base (the embedded default included) is converted
    there first if it is missing, with a phase event so a first run does not look hung."""
    def say(message: str) -> None:
        log(message)
        if progress is not None:
            progress.phase(BASE_STAGE, message)

    try:
        return load_or_convert(cfg, say)
    except LoadError as exc:
        raise StageError(str(exc)) from None


def cpu_bf16(setting: str) -> bool:
    """bf16 autocast on a CPU: 'on', 'off', or 'auto' (when the CPU has native bf16 matmuls)."""
    return setting == "on" if setting != "auto" else cpu_native_bf16()


def hyper(t: TrainingConfig, stage: str):
    """The stage's hyperparameters from the effective training settings."""
    s = getattr(t, stage)
    return sft.Hyper(
        learning_rate=s.learning_rate, epochs=s.epochs, batch_size=t.batch_size, grad_accum=t.grad_accum,
        warmup_ratio=t.warmup_ratio, max_length=t.max_length, seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing, lora_r=t.lora.r, lora_alpha=t.lora.alpha,
        lora_dropout=t.lora.dropout, target_modules=t.lora.target_modules,
        cpu_bf16=not on_gpu() and cpu_bf16(t.cpu_bf16),
        distill_replay=t.mix.replay_answers == "base" and t.mix.replay_loss == "distill",
    )


def choose_parent(reg: Registry, stage: str, parent: Optional[str]) -> Optional[str]:
    if parent:
        reg.get(parent)
        return parent
    if stage == "anchor":
        return None
    if stage == "generalize":
        v = reg.latest("anchor")
        if not v:
            raise StageError("generalize continues from an anchor version, and there is none: run anchor first")
        return v
    v = reg.promoted()
    if not v:
        raise StageError("calibrate continues from the promoted adapter, and none is promoted: "
                         "run `python -m trainer bootstrap` (or anchor, eval, promote) first")
    return v


def learned_corrections(reg: Registry, version: Optional[str]) -> set[tuple[str, str]]:
    """correction_key of every correction `version` and its ancestors trained on."""
    keys, seen = set(), set()
    while version and version not in seen:
        seen.add(version)
        manifest = reg.get(version)
        keys |= {correction_key(c["messages"][-1]["content"], c["correction"])
                 for c in manifest.get("corrections") or []}
        version = manifest.get("parent")
    return keys


def build_samples(cfg: Config, t: TrainingConfig, stage: str, corrections_file: Optional[str],
                  learned: Collection[tuple[str, str]] = (),
                  answer_general: Optional[Callable[[list], list]] = None) -> tuple[list, dict, list]:
    """(samples with their system prompts, counts, corrections recorded in the manifest).
    `answer_general` turns general rows into replay samples under the system prompt
    (default: the dataset's answers; run_stage passes trainer.replay's base answers)."""
    system, fill, seed = cfg.identity.system, cfg.identity.fill, t.seed
    if answer_general is None:
        answer_general = lambda rows: [ds.with_system(g, system) for g in rows]  # noqa: E731
    if stage == "anchor":
        rows = identity_rows(cfg)
        counts = {"identity_samples": len(rows)}
        samples = ds.both_system_variants(rows, system)
        if t.mix.anchor_general_ratio > 0:
            general = ds.sample_rows(general_rows(cfg), round(t.mix.anchor_general_ratio * len(rows)), seed)
            samples += answer_general(general)
            counts["general_samples"] = len(general)
        return samples, counts, []
    if stage == "generalize":
        general, identity = general_rows(cfg), identity_rows(cfg)
        # Identity is oversampled to GENERALIZE_IDENTITY_SHARE of the general rows, so a
        # pass over general data does not wash out what anchor taught.
        wanted = max(len(identity), round(GENERALIZE_IDENTITY_SHARE * len(general)))
        identity = ds.sample_rows(identity, wanted, seed)
        samples = answer_general(general) + ds.both_system_variants(identity, system)
        return samples, {"general_samples": len(general), "identity_samples": len(identity)}, []
    corrections = checked_corrections(cfg, corrections_file)
    mix = t.mix
    samples, counts = calibration_mix(corrections, identity_rows(cfg), general_rows(cfg), mix.identity_ratio,
                                      mix.general_ratio, system, fill, seed, new_repeats=mix.new_correction_repeats,
                                      learned=learned, rewordings=mix.rewordings, answer_general=answer_general,
                                      min_general=mix.min_general_samples)
    recorded = [{"id": c.id, "messages": c.messages, "correction": c.correction} for c in deduplicate(corrections)]
    return samples, counts, recorded


def checked_corrections(cfg: Config, corrections_file: Optional[str]) -> list:
    """Calibrate's input, or a StageError saying what is missing or which corrections it will
    not train (CorrectionsRefused); run_stage asks before it loads any model."""
    if not corrections_file:
        raise StageError("calibrate needs --corrections FILE (the JSONL the bot exports)")
    corrections = load_corrections(corrections_file)
    if not corrections:
        raise StageError(f"{corrections_file}: no corrections to learn from")
    # Only what would be trained: a correction a later one for the same question replaced is not.
    refused = refusals(deduplicate(corrections), cfg.identity.name, cfg.identity.author, forbidden_identities(cfg))
    if refused:
        raise CorrectionsRefused(refused)
    return corrections


def training_helper(cfg: Config, base: Path):
    """A trainer.parallel.Helper when `training.cpu_data_parallel` finds a core to spare."""
    t = training_settings(cfg)
    if not spare_cores(cfg, str(base), t.cpu_data_parallel):
        return None
    return Helper(str(base), t.cpu_threads)


def base_replay(cfg: Config, reg: Registry, base: Path, model, tokenizer, counts: dict,
                progress: Optional[Progress], stage: str, helper=None) -> Callable[[list], list]:
    """General rows -> replay samples answered by the base model (`model` before any
    adapter is attached), cached per base in the registry; see trainer.replay."""
    names = forbidden_identities(cfg)

    def claims(answer: str) -> list:
        return identity_claims(answer, cfg.identity.name, cfg.identity.author, names)

    def say(message: str) -> None:
        log(f"{stage}: {message}")
        if progress is not None:
            progress.phase(stage, f"{stage}: {message}")

    def generate(prompts: list) -> list:
        model.eval()
        # With a helper, it answers the second half while this process answers the first.
        half = len(prompts) // 2 if helper is not None and len(prompts) > 1 else 0
        if half and helper.answer_start(prompts[half:], replay.REPLAY_MAX_NEW_TOKENS):
            mine = greedy_replies(model, tokenizer, prompts[:half], replay.REPLAY_MAX_NEW_TOKENS)
            theirs = helper.answer_result()
            if theirs is not None and len(theirs) == len(prompts) - half:
                return mine + theirs
            return mine + greedy_replies(model, tokenizer, prompts[half:], replay.REPLAY_MAX_NEW_TOKENS)
        return greedy_replies(model, tokenizer, prompts, replay.REPLAY_MAX_NEW_TOKENS)

    def answer(rows: list) -> list:
        samples, n = replay.answered_by_base(rows, cfg.identity.system, replay.cache_file(reg.root, str(base)),
                                             generate, claims, say)
        counts.update(n)
        return samples

    return answer


# ---- the run --------------------------------------------------------------


def run_stage(cfg: Config, stage: str, progress: Progress, corrections_file: Optional[str] = None,
              parent: Optional[str] = None) -> tuple[str, dict]:
    """Train one stage and register the result as a new candidate version."""
    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    reg = registry_for(cfg)
    if stage == "calibrate":  # a bad corrections file is reported before anything slow runs
        checked_corrections(cfg, corrections_file)
    base = ensure_base(cfg, progress)
    t = training_settings(cfg)
    parent = choose_parent(reg, stage, parent)
    if parent:
        parent_base = reg.get(parent).get("base")
        if parent_base and Path(parent_base) != base:
            raise StageError(f"{parent} was trained on base {parent_base}, but the configured base is {base}")
    learned = learned_corrections(reg, parent) if stage == "calibrate" else set()
    if progress is not None:
        progress.phase(stage, f"{stage}: loading the base model")
    helper = training_helper(cfg, base)  # loads its copy while this process loads and builds
    try:
        return _train_stage(cfg, stage, progress, corrections_file, reg, base, t, parent, learned, helper)
    finally:
        if helper is not None:
            helper.stop()


def _train_stage(cfg: Config, stage: str, progress: Progress, corrections_file: Optional[str], reg: Registry,
                 base: Path, t: TrainingConfig, parent: Optional[str], learned: set, helper) -> tuple[str, dict]:
    model, tokenizer = sft.load_base(base)
    replay_counts: dict = {}
    answer_general = None
    if t.mix.replay_answers == "base":
        answer_general = base_replay(cfg, reg, base, model, tokenizer, replay_counts, progress, stage, helper)
    samples, counts, recorded = build_samples(cfg, t, stage, corrections_file, learned, answer_general)
    counts.update(replay_counts)
    hp = hyper(t, stage)
    log(f"{stage}: {len(samples)} samples ({counts}), parent {parent or 'base'}, base {base}")
    encoded, dropped = encode_all(tokenizer, samples, hp.max_length)
    if not encoded:
        raise StageError(f"every sample is longer than training.max_length={hp.max_length} before its answer")
    if stage == "calibrate" and t.calibrate_min_steps:
        hp.epochs = max(hp.epochs, sft.epochs_for_steps(t.calibrate_min_steps, len(encoded), hp))
    adapter = str(reg.path(parent)) if parent else None
    model = sft.with_lora(model, hp, adapter)
    blend = t.calibrate_blend if stage == "calibrate" and adapter and t.calibrate_blend < 1 else None
    start = sft.lora_state(model) if blend else None  # the parent's LoRA, to blend the result with
    shard = helper.train_shard(adapter, hp, encoded) if helper is not None else None
    if shard is not None:
        log(f"{stage}: training in {shard.world} process(es)")
    # The version is written into a private staging dir that becomes vNNNN only
    # when complete; a run killed before that leaves an unlisted dir, removed later.
    staging = reg.new_staging_dir()
    try:
        progress.start(stage, sft.plan_steps(len(encoded), hp))
        started = time.time()
        try:
            stats = sft.train(model, tokenizer, encoded, hp, shard=shard,
                              on_step=lambda step, total, loss, tokens: progress.step(step, loss, tokens))
        finally:
            if shard is not None:
                shard.close()
        stats["processes"] = shard.world if shard is not None else 1
        if blend:
            sft.blend_with(model, start, blend)
            stats["blend"] = blend
        sft.save_adapter(model, staging)
        manifest = {
            "stage": stage,
            "parent": parent,
            "base": str(base),
            "identity": {"name": cfg.identity.name, "author": cfg.identity.author, "system": cfg.identity.system},
            "data_hash": ds.data_hash(samples),
            "samples": {"total": len(encoded), "dropped_too_long": dropped, **counts},
            "profile": t.profile,
            "hyperparameters": hp.as_dict(),
            "train": {**stats, "wall_s": round(time.time() - started, 2)},
            "corrections": recorded,
            "metrics": {},
        }
        version = reg.commit(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return version, reg.get(version)
