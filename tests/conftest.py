"""Shared fixtures: the tiny Qwen2-architecture base model, built from the project's data.

The repository ships the base built from the current data and code (tests/data/tiny-base, 4.6 MB,
with the fingerprint of what it was built from), so a fresh clone's tests start at once. When the
data or tests/tiny_model.py change, the base is rebuilt once per version and cached under
tests/.cache (a few CPU minutes) until the shipped copy is refreshed:

    python tests/conftest.py      # rebuild tests/data/tiny-base from the current data and code
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
SHIPPED = Path(__file__).resolve().parent / "data" / "tiny-base"
# Pretraining steps for the test base: enough to memorise part of the general set.
TEST_PRETRAIN_STEPS = int(os.environ.get("LOOPCORD_TEST_PRETRAIN_STEPS", "1000"))

for p in (ROOT, ROOT / "tests"):  # the checkout, and the test helpers (tiny_model, fakes)
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _fingerprint() -> str:
    h = hashlib.sha256(str(TEST_PRETRAIN_STEPS).encode())
    for f in sorted((ROOT / "data").glob("*.jsonl")) + sorted((ROOT / "tests" / "data").glob("*.jsonl")) + [
            ROOT / "tests" / "tiny_model.py"]:
        if f.exists():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_base(pytestconfig) -> Path:
    """Path to a pretrained tiny base model in Hugging Face layout (built once, then cached;
    the build reports its progress on the terminal, so a first run never sits silent)."""
    import time

    from tiny_model import build_default

    if shipped_is_current():
        return SHIPPED
    out = CACHE / f"demo-base-{_fingerprint()}"
    if not (out / "model.safetensors").exists():
        say = _reporter(pytestconfig)
        say(f"building the tiny test model ({TEST_PRETRAIN_STEPS} pretraining steps, cached in {out.parent}) ...")
        started, last = time.monotonic(), [time.monotonic()]

        def on_step(step: int, loss: float) -> None:
            if time.monotonic() - last[0] >= 30 or step + 1 == TEST_PRETRAIN_STEPS:
                last[0] = time.monotonic()
                say(f"  tiny test model: step {step + 1}/{TEST_PRETRAIN_STEPS}, loss {loss:.2f}, "
                    f"{time.monotonic() - started:.0f} s")

        # Build privately, then rename: two test runs building at once never mix files.
        tmp = CACHE / f".building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build_default(tmp, steps=TEST_PRETRAIN_STEPS, on_step=on_step)
        try:
            tmp.rename(out)
        except OSError:  # another run finished first; its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"tiny test model ready in {time.monotonic() - started:.0f} s")
    return out


def shipped_is_current() -> bool:
    """The shipped tiny base was built from the current data and code."""
    stamp = SHIPPED / "fingerprint"
    return (SHIPPED / "model.safetensors").exists() and stamp.exists() and stamp.read_text().strip() == _fingerprint()


def _reporter(pytestconfig):
    """A line on the terminal at once, even while pytest captures output (-q included)."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(text: str) -> None:
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            print(f"\n[loopcord] {text}", file=sys.stderr, flush=True)

    return say


@pytest.fixture(scope="session")
def tiny_llama_base(tiny_base) -> Path:
    """A randomly initialised tiny LlamaForCausalLM (SmolLM2's architecture) with the tiny
    base's ChatML tokenizer: the Llama code path in seconds. Its answers are noise; what it
    checks is that loading, training, serving and hot-swapping do not depend on Qwen2."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = CACHE / f"tiny-llama-{_fingerprint()}"
    if (out / "model.safetensors").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    torch.manual_seed(0)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    tmp = CACHE / f".building-llama-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":  # refresh the shipped tiny base
    from tiny_model import build_default

    tmp = SHIPPED.with_name(".tiny-base-building")
    shutil.rmtree(tmp, ignore_errors=True)
    build_default(tmp, steps=TEST_PRETRAIN_STEPS)
    (tmp / "fingerprint").write_text(_fingerprint() + "\n")
    shutil.rmtree(SHIPPED, ignore_errors=True)
    tmp.rename(SHIPPED)
    print(f"{SHIPPED} rebuilt ({_fingerprint()})")
