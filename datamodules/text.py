"""``TextDataModule``: one datamodule for every text-trained MemLM model.

source -> tokenizer (trained once, cached as JSON) -> token ids cached on disk (.npy,
memory-mapped) -> loader (random windows for transformers, contiguous streams for
stateful/TBPTT models). The tokenizer is handed to the model and stored in every
checkpoint; ``vocab_size`` is linked into the model config by the CLI.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np

from memlm.datamodules import sources
from memlm.datamodules.encode import PIECE_CHARS, encode_documents, pieces
from memlm.datamodules.loaders import RandomWindowLoader, SequentialWindowLoader, StreamLoader
from memlm.core.tokenizer import EOS, TextTokenizer, build_tokenizer
from memlm.core.checks import require_positive
from memlm.core.errors import MemLMError

SPLITS = ("train", "val", "test")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEMLM_CACHE", Path.home() / ".cache" / "memlm"))


def _local_rank() -> int:
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):  # Lightning/torchrun children, srun tasks
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _wait_for_local_rank_zero(path: Path) -> None:
    """On a node's other ranks, wait until local rank 0 has written ``path``.

    Under srun or torchrun every rank instantiates the datamodule at once; without this each
    would train the same tokenizer on the whole corpus.
    """
    if _local_rank() == 0:
        return
    timeout = float(os.environ.get("MEMLM_PREP_TIMEOUT", "3600"))
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise MemLMError(f"waited {timeout:.0f} s for local rank 0 to write {path}; see rank 0's log "
                             "(a slow first preparation can raise MEMLM_PREP_TIMEOUT)")
        time.sleep(0.2)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


class TextDataModule(L.LightningDataModule):
    """Text for language modelling.

    Args:
        source: ``builtin`` (CPython's pydoc_data text, offline), ``files`` (``data_dir`` in
            WikiText layout or ``files``), or ``hf`` (``dataset_name``/``dataset_config``, where
            ``dataset_name`` may also be a local parquet/arrow/json/csv file, a folder of split
            files, or a ``datasets`` ``save_to_disk`` folder).
        tokenizer: ``char``, ``byte``, ``bpe`` or a path to a tokenizer JSON.
        vocab_size: target vocabulary for ``bpe``.
        block_size: tokens per training window / TBPTT chunk.
        sampler: ``random`` windows (stateless models) or ``stream`` (B contiguous streams per rank).
        steps_per_epoch: random-window batches per epoch (default: one pass over the train tokens).
        max_val_batches: cap on evaluation windows (None = the whole split).
    """

    def __init__(
        self,
        source: Literal["builtin", "files", "hf"] = "builtin",
        data_dir: str | None = None,
        files: list[str] | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        text_field: str = "text",
        max_chars: int | None = None,
        tokenizer: str = "bpe",
        vocab_size: int = 2048,
        block_size: int = 128,
        batch_size: int = 16,
        sampler: Literal["random", "stream"] = "random",
        steps_per_epoch: int | None = None,
        max_val_batches: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 1234,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if source not in ("builtin", "files", "hf"):
            raise MemLMError(f"unknown data.source {source!r}: use builtin, files or hf")
        if source == "hf" and not dataset_name:
            raise MemLMError("source=hf needs data.dataset_name (e.g. wikitext) and data.dataset_config")
        if sampler not in ("random", "stream"):
            raise MemLMError(f"unknown data.sampler {sampler!r}: use random or stream")
        require_positive("data", vocab_size=vocab_size, block_size=block_size, batch_size=batch_size,
                         steps_per_epoch=steps_per_epoch)
        self.source, self.data_dir, self.files = source, data_dir, files
        self.dataset_name, self.dataset_config, self.text_field = dataset_name, dataset_config, text_field
        self.max_chars = max_chars
        self.tokenizer_spec, self.target_vocab = tokenizer, vocab_size
        self.block_size, self.batch_size, self.sampler = block_size, batch_size, sampler
        self.steps_per_epoch, self.max_val_batches = steps_per_epoch, max_val_batches
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._tokenizer: TextTokenizer | None = None
        self._splits: dict | None = None
        self._ident: str | None = None
        self._ids: dict[str, np.ndarray] = {}

    # -- text + tokenizer ---------------------------------------------------------------
    def _load_text(self) -> None:
        if self._splits is not None:
            return
        if self.source == "builtin":
            self._splits, self._ident = sources.builtin_corpus()
        elif self.source == "files":
            self._splits, self._ident = sources.local_files(self.data_dir, self.files, self.val_fraction, self.test_fraction)
        else:
            self._splits, self._ident = sources.hf_dataset(self.dataset_name, self.dataset_config, self.text_field, self.max_chars,
                                                           self.val_fraction, self.test_fraction)

    def _source_ident(self) -> str:
        """Identity of the source without reading it (cheap, used for cache keys)."""
        if self.source == "builtin":
            import sys

            return f"builtin:pydoc_data:{sys.version_info.major}.{sys.version_info.minor}"
        self._load_text()
        return self._ident

    def _cache_key(self) -> str:
        spec = self.tokenizer_spec
        if spec.endswith(".json"):
            spec = f"file:{hashlib.sha1(Path(spec).read_bytes()).hexdigest()}" if Path(spec).is_file() else spec
        raw = json.dumps([self._source_ident(), spec, self.target_vocab if self.tokenizer_spec == "bpe" else None])
        return hashlib.sha1(raw.encode()).hexdigest()[:16]

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._prepare_tokenizer()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _prepare_tokenizer(self) -> TextTokenizer:
        if self.tokenizer_spec.endswith(".json"):
            return TextTokenizer.load(self.tokenizer_spec)
        if self.tokenizer_spec == "byte":
            return build_tokenizer("byte")
        path = self.cache_dir / self._cache_key() / "tokenizer.json"
        _wait_for_local_rank_zero(path)
        if path.is_file():
            try:
                return TextTokenizer.load(path)
            except MemLMError:
                path.unlink()  # corrupt cache entry: rebuild it
        self._load_text()
        # pieces cut where pre-tokens end: the same word counts (hence the same tokenizer) as the
        # whole documents, but the trainer can count them on all cores
        train_pieces = (p for doc in self._splits["train"] for p in pieces(doc, 1 << 16))
        tok = build_tokenizer(self.tokenizer_spec, train_pieces, self.target_vocab)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.save(tmp)
        os.replace(tmp, path)
        return tok

    # -- token ids --------------------------------------------------------------------
    def split_ids(self, split: str) -> np.ndarray:
        """Token ids of ``split`` (train/val/test), documents separated by the EOS token."""
        if split not in SPLITS:
            raise MemLMError(f"unknown split {split!r}")
        if split in self._ids:
            return self._ids[split]
        tok = self.tokenizer
        path = self.cache_dir / self._cache_key() / f"{tok.fingerprint()}-{split}.npy"
        if path.is_file():
            try:
                self._ids[split] = np.load(path, mmap_mode="r", allow_pickle=False)
                return self._ids[split]
            except (ValueError, OSError):
                path.unlink()
        self._load_text()
        docs = self._splits.get(split) or []
        # built-in kinds cut documents into pieces for the parallel encoder (same ids);
        # a foreign tokenizer.json may normalise across a cut, so it encodes whole documents
        piece_chars = PIECE_CHARS if tok.kind in ("char", "byte", "bpe") else None
        ids = encode_documents(tok, docs, tok.eos_id, piece_chars=piece_chars)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(path, ids)
        self._ids[split] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._ids[split]

    def prepare_data(self) -> None:
        # rank 0 tokenizes and caches; other ranks memory-map the result in setup().
        for split in SPLITS:
            self.split_ids(split)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            self.split_ids(split)
        train = self.split_ids("train")
        if len(train) < self.block_size + 2:
            raise MemLMError(f"training split has only {len(train)} tokens, fewer than block_size {self.block_size}")

    # -- loaders ----------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _epoch_fn(self):
        return lambda: self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self):
        rank, world = self._rank_world()
        ids = self.split_ids("train")
        if self.sampler == "stream":
            return StreamLoader(ids, self.block_size, self.batch_size, rank, world, epoch_fn=self._epoch_fn())
        steps = self.steps_per_epoch or max(1, len(ids) // (self.batch_size * self.block_size * world))
        return RandomWindowLoader(ids, self.block_size, self.batch_size, steps, self.seed, rank, world, self._epoch_fn())

    def _eval_loader(self, split: str):
        ids = self.split_ids(split)
        if len(ids) < self.block_size + 1:
            return []
        rank, world = self._rank_world()
        if self.sampler == "stream":
            return StreamLoader(ids, self.block_size, min(self.batch_size, max(1, len(ids) // (self.block_size + 1) // world)),
                                rank, world, max_chunks=self.max_val_batches)
        max_windows = self.max_val_batches * self.batch_size * world if self.max_val_batches else None
        return SequentialWindowLoader(ids, self.block_size, self.batch_size, rank, world, max_windows)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("test")


__all__ = ["TextDataModule", "EOS"]
