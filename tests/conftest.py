"""Shared fixtures: the tiny Qwen2-architecture base model, built from the project's data.

The repository ships the base built from the current data and code (devkit/data/tiny-base,
4.6 MB, with the fingerprint of what it was built from), so a fresh clone's tests start at
once. When the data or devkit/tiny_model.py change, the base is rebuilt once per version and
cached under devkit/.cache (a few CPU minutes) until the shipped copy is refreshed
(devkit/tiny_base.py):

    python tests/conftest.py      # rebuild devkit/data/tiny-base from the current data and code
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the checkout: bot, model, trainer, devkit and tests.support
    sys.path.insert(0, str(ROOT))

from devkit import tiny_base as tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(pytestconfig) -> Path:
    """Path to a pretrained tiny base model in Hugging Face layout (built once, then cached;
    the build reports its progress on the terminal, so a first run never sits silent)."""
    return tiny.ensure(say=_reporter(pytestconfig))


def _reporter(pytestconfig):
    """A line on the terminal at once, even while pytest captures output (-q included)."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(text: str) -> None:
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            print(f"\n[loopcord] {text}", file=sys.stderr, flush=True)

    return say


@pytest.fixture(scope="session")
def tiny_bootstrapped(tiny_base, tmp_path_factory) -> Path:
    """A registry with the tiny base's identity adapter promoted by `python -m trainer bootstrap`
    with the tests' recipe, built once per session (a CPU minute or two); tests copy it."""
    import subprocess

    import yaml
    from devkit.tiny_profile import tiny_sections
    from trainer.registry import Registry

    tmp = tmp_path_factory.mktemp("tiny-bootstrap")
    sections = tiny_sections(tiny_base)
    sections["training"].update({"registry_dir": str(tmp / "adapters"), "work_dir": str(tmp / "runs")})
    sections["store"] = {"path": str(tmp / "loopcord.db")}
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(sections), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "trainer", "bootstrap", "--config", str(config), "--progress", "none"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Registry(tmp / "adapters").promoted()
    return tmp / "adapters"


@pytest.fixture(scope="session")
def tiny_llama_base(tiny_base) -> Path:
    """A randomly initialised tiny LlamaForCausalLM (SmolLM2's architecture) with the tiny
    base's ChatML tokenizer: the Llama code path in seconds. Its answers are noise; what it
    checks is that loading, training, serving and hot-swapping do not depend on Qwen2."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tiny.CACHE / f"tiny-llama-{tiny.fingerprint()}"
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
    tmp = tiny.CACHE / f".building-llama-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    """A small ChatML tokenizer for the random tiny models of tests/support/engine.py (a module
    may define its own `tokenizer` instead, as test_worker_hardening does)."""
    from tests.support.engine import engine_tokenizer

    return engine_tokenizer()


@pytest.fixture
async def fake_vllm():
    """A vLLM-shaped server on 127.0.0.1 (devkit/fake_vllm.py), for the terminal's tests."""
    from devkit.fake_vllm import FakeVLLM

    fake = FakeVLLM(max_model_len=2048)
    await fake.start()
    yield fake
    await fake.close()


if __name__ == "__main__":  # refresh the shipped tiny base
    print(f"{tiny.refresh()} rebuilt ({tiny.fingerprint()})")
