"""The training recipe the tests use on the tiny fixture model, as ordinary config.

`profiles: {tiny: ...}` plus `training.profile: tiny`: the seeds' 7B recipe teaches
a model of a million parameters nothing in CPU seconds. Kept apart from
tiny_model.py, whose contents key the cached fixture build.
"""


# The tests' training recipe for the tiny base (higher learning rates, batch 8; new
# corrections repeated and replayed with identity so a greedy answer moves in seconds).
TINY_PROFILE = {
    "batch_size": 8,
    "grad_accum": 1,
    "max_length": 2048,
    "anchor": {"learning_rate": 2e-3, "epochs": 8.0},
    "generalize": {"learning_rate": 1e-3, "epochs": 3.0},  # general rows once (system prompt), identity twice
    "calibrate": {"learning_rate": 1e-3, "epochs": 1.0},
    "calibrate_min_steps": 320,
    "mix": {"identity_ratio": 2.5, "general_ratio": 1.5, "new_correction_repeats": 32, "rewordings": 0,
            "anchor_general_ratio": 0.0},
    "cpu_threads": 1,
    "cpu_bf16": "off",
}
# Gate thresholds for the tiny base: it answers few held-out questions right, and its
# corrections are words it already knows.
# Its general loss also drifts more at these learning rates than a real model's does.
TINY_EVAL = {"min_corrections_learned": 0.5, "min_general_retention": 0.5, "max_general_loss_increase": 0.35}


def tiny_sections(base) -> dict:
    """Config sections that run the product on the tiny base with the tests' recipe."""
    return {
        "model": {"base": str(base)},
        "profiles": {"tiny": TINY_PROFILE},
        "training": {"profile": "tiny"},
        "eval": dict(TINY_EVAL),
    }
