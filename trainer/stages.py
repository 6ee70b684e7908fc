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
Every sample is trained twice: with the identity system prompt and with none
(the chat template then injects the base's own identity, which must not win).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Collection, Optional

from model.config import Config
from trainer import datasets as ds
from trainer.corrections import calibration_mix, correction_key, deduplicate, load_corrections
from trainer.progress import Progress, log
from trainer.registry import Registry, RegistryError

STAGES = ("anchor", "generalize", "calibrate")
DEMO_BASE_STAGE = "demo-base"  # the progress events' stage while the demo base is pretrained
DEMO_MARKER = "loopcord_demo.json"
# Identity rows in the generalize stage, relative to the general rows (oversampled).
GENERALIZE_IDENTITY_SHARE = 0.5
# Settings for the ~1M-parameter demo base on CPU (training.tiny_recipe). The seeds'
# recipe (lr 2e-4 / 1e-4 / 5e-5, batch 1 x accumulation 16) is for Qwen2.5-7B; on the
# tiny model it moves the loss by almost nothing in the minutes a CPU install has.
TINY_RECIPE = {
    "batch_size": 8,
    "grad_accum": 1,
    "anchor": (2e-3, 8.0),  # (learning rate, epochs); 6 left held-out identity at ~0.79 on one thread
    "generalize": (1e-3, 2.0),
    "calibrate": (1e-3, 1.0),  # one pass: the mix below already repeats what is new
    # A new correction is 2 samples; repeated this often, with identity and general
    # replay in proportion, it gets enough steps to move a greedy answer.
    "new_correction_repeats": 32,
    # (identity_ratio, general_ratio) instead of training.mix's: at lr 1e-3 the tiny model's
    # held-out identity answers drift to the new answer unless identity replay outweighs it.
    "calibrate_mix": (2.5, 1.5),
    # At least this many steps: with 160, one or two corrections either stayed unlearned or
    # cost identity (seesaw); 320 learned 1, 2 and 4 of 5 with identity 1.0 and general
    # loss/accuracy at or better than the parent's (about 30 s on a busy 2-core CPU).
    "calibrate_min_steps": 320,
}


class StageError(RuntimeError):
    """A stage that cannot run as asked; str() says what to do."""


# ---- inputs ---------------------------------------------------------------


def registry_for(cfg: Config) -> Registry:
    return Registry(cfg.path(cfg.training.registry_dir))


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
    """The base model directory; the demo base is built there first if it is missing
    (reporting each pretraining step to `progress` as stage "demo-base")."""
    path = cfg.path(cfg.model.base or cfg.model.demo_dir)
    if cfg.model.base:
        if not (path / "config.json").is_file():
            raise StageError(f"model.base: {path} is not a Hugging Face model directory (no config.json)")
        return path.resolve()
    if not (path / "config.json").is_file():
        from trainer.demo_base import build_default

        steps = cfg.training.demo_base_steps
        log(f"building the demo base model in {path} ({steps} pretraining steps, first run only) ...")
        tmp = path.with_name(path.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.time()
        build_default(tmp, steps=steps, on_step=demo_base_reporter(progress, steps))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        log(f"demo base ready in {time.time() - started:.0f} s")
    return path.resolve()


def demo_base_reporter(progress: Optional[Progress], steps: int):
    """on_step for the demo base's pretraining loop, feeding `progress` (None: silent)."""
    if progress is None:
        return None
    progress.start(DEMO_BASE_STAGE, steps)

    def on_step(step: int, loss: float) -> None:  # step is 0-based in the pretraining loop
        progress.step(step + 1, loss, None)  # the pretraining loop does not count tokens
        if step + 1 == steps:
            progress.close()

    return on_step


def apply_cpu_threads(cfg: Config) -> None:
    """training.cpu_threads for torch when there is no GPU (0 keeps torch's default)."""
    import torch

    if cfg.training.cpu_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(cfg.training.cpu_threads)


def stage_config(cfg: Config, stage: str):
    return getattr(cfg.training, stage)


def is_demo_base(base: Path) -> bool:
    return (Path(base) / DEMO_MARKER).is_file()


def hyper(cfg: Config, stage: str, base: Optional[Path] = None):
    """The stage's hyperparameters: config values, or TINY_RECIPE on the demo base."""
    from trainer.sft import Hyper

    t, s = cfg.training, stage_config(cfg, stage)
    lr, epochs, batch_size, grad_accum = s.learning_rate, s.epochs, t.batch_size, t.grad_accum
    if uses_tiny_recipe(cfg, base):
        lr, epochs = TINY_RECIPE[stage]
        batch_size, grad_accum = TINY_RECIPE["batch_size"], TINY_RECIPE["grad_accum"]
    return Hyper(
        learning_rate=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
        warmup_ratio=t.warmup_ratio, max_length=t.max_length, seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing, lora_r=t.lora.r, lora_alpha=t.lora.alpha,
        lora_dropout=t.lora.dropout, target_modules=t.lora.target_modules,
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


def uses_tiny_recipe(cfg: Config, base: Optional[Path]) -> bool:
    return base is not None and cfg.training.tiny_recipe and is_demo_base(base)


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


def build_samples(cfg: Config, stage: str, corrections_file: Optional[str], base: Optional[Path] = None,
                  learned: Collection[tuple[str, str]] = ()) -> tuple[list, dict, list]:
    """(samples before system-prompt doubling, counts, corrections recorded in the manifest)."""
    system, fill, seed = cfg.identity.system, cfg.identity.fill, cfg.training.seed
    if stage == "anchor":
        rows = identity_rows(cfg)
        return rows, {"identity_samples": len(rows)}, []
    if stage == "generalize":
        general, identity = general_rows(cfg), identity_rows(cfg)
        # Identity is oversampled to GENERALIZE_IDENTITY_SHARE of the general rows, so a
        # pass over general data does not wash out what anchor taught.
        wanted = max(len(identity), round(GENERALIZE_IDENTITY_SHARE * len(general)))
        identity = ds.sample_rows(identity, wanted, seed)
        return general + identity, {"general_samples": len(general), "identity_samples": len(identity)}, []
    if not corrections_file:
        raise StageError("calibrate needs --corrections FILE (the JSONL the bot exports)")
    corrections = load_corrections(corrections_file)
    if not corrections:
        raise StageError(f"{corrections_file}: no corrections to learn from")
    mix = cfg.training.mix
    repeats, ratios = mix.new_correction_repeats, (mix.identity_ratio, mix.general_ratio)
    if uses_tiny_recipe(cfg, base):
        repeats, ratios = TINY_RECIPE["new_correction_repeats"], TINY_RECIPE["calibrate_mix"]
    samples, counts = calibration_mix(corrections, identity_rows(cfg), general_rows(cfg), *ratios, system, fill,
                                      seed, new_repeats=repeats, learned=learned)
    recorded = [{"id": c.id, "messages": c.messages, "correction": c.correction} for c in deduplicate(corrections)]
    return samples, counts, recorded


# ---- the run --------------------------------------------------------------


def run_stage(cfg: Config, stage: str, progress: Progress, corrections_file: Optional[str] = None,
              parent: Optional[str] = None) -> tuple[str, dict]:
    """Train one stage and register the result as a new candidate version."""
    from trainer import sft
    from trainer.encode import encode_all

    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    reg = registry_for(cfg)
    base = ensure_base(cfg, progress)
    parent = choose_parent(reg, stage, parent)
    if parent:
        parent_base = reg.get(parent).get("base")
        if parent_base and Path(parent_base) != base:
            raise StageError(f"{parent} was trained on base {parent_base}, but the configured base is {base}")
    learned = learned_corrections(reg, parent) if stage == "calibrate" else set()
    rows, counts, recorded = build_samples(cfg, stage, corrections_file, base, learned)
    samples = ds.both_system_variants(rows, cfg.identity.system)
    hp = hyper(cfg, stage, base)
    log(f"{stage}: {len(samples)} samples ({counts}), parent {parent or 'base'}, base {base}")

    model, tokenizer = sft.load_base(base)
    encoded, dropped = encode_all(tokenizer, samples, hp.max_length)
    if not encoded:
        raise StageError(f"every sample is longer than training.max_length={hp.max_length} before its answer")
    if stage == "calibrate" and uses_tiny_recipe(cfg, base):
        hp.epochs = max(hp.epochs, sft.epochs_for_steps(TINY_RECIPE["calibrate_min_steps"], len(encoded), hp))
    model = sft.with_lora(model, hp, reg.path(parent) if parent else None)
    # The version is written into a private staging dir that becomes vNNNN only
    # when complete; a run killed before that leaves an unlisted dir, removed later.
    staging = reg.new_staging_dir()
    try:
        progress.start(stage, sft.plan_steps(len(encoded), hp))
        started = time.time()
        stats = sft.train(model, tokenizer, encoded, hp,
                          on_step=lambda step, total, loss, tokens: progress.step(step, loss, tokens))
        sft.save_adapter(model, staging)
        manifest = {
            "stage": stage,
            "parent": parent,
            "base": str(base),
            "identity": {"name": cfg.identity.name, "author": cfg.identity.author, "system": cfg.identity.system},
            "data_hash": ds.data_hash(samples),
            "samples": {"total": len(encoded), "dropped_too_long": dropped, **counts},
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
