"""FAISS index over the active memories' embeddings, derived from SQLite.

The index lives beside the database (``<db>.faiss`` + ``<db>.faiss.json``). The JSON
records the store's ``generation`` and the embedder the index was built with; when
either differs from the database, or a file is missing or unreadable, the index is rebuilt
from SQLite (the source of truth). Exact inner-product search (``IndexFlatIP`` under an
``IndexIDMap2`` keyed by memory id) on normalised vectors = cosine similarity.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np

from memlm.memory.ltml.store import Store


class MemoryIndex:
    def __init__(self, store: Store, embedder_name: str) -> None:
        self.store = store
        self.embedder_name = embedder_name
        self.path = Path(str(store.path) + ".faiss")
        self.meta_path = Path(str(store.path) + ".faiss.json")
        self.index: faiss.Index | None = None
        self.generation = -1
        self.rebuilt = False

    def _fresh_meta(self) -> dict:
        return {"generation": self.store.generation(), "embedder": self.embedder_name}

    def ensure(self) -> "MemoryIndex":
        """Load the on-disk index when it is current, else rebuild it from SQLite."""
        want = self._fresh_meta()
        if self.index is not None and self.generation == want["generation"]:
            return self
        if self.path.is_file() and self.meta_path.is_file():
            try:
                meta = json.loads(self.meta_path.read_text())
                if meta.get("generation") == want["generation"] and meta.get("embedder") == want["embedder"]:
                    self.index = faiss.read_index(str(self.path))
                    self.generation = want["generation"]
                    self.rebuilt = False
                    return self
            except (ValueError, RuntimeError, OSError):
                pass  # unreadable or stale: rebuild below
        return self.rebuild()

    def rebuild(self) -> "MemoryIndex":
        gen = self.store.generation()
        mems = [m for m in self.store.memories(active_only=True) if m.embedding is not None]
        dim = int(mems[0].embedding.shape[0]) if mems else 1
        mems = [m for m in mems if m.embedding.shape[0] == dim]
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if mems:
            vecs = np.stack([m.embedding for m in mems]).astype(np.float32)
            index.add_with_ids(vecs, np.array([m.id for m in mems], dtype=np.int64))
        self.index, self.generation, self.rebuilt = index, gen, True
        try:
            tmp = self.path.with_suffix(".faiss.tmp")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, self.path)
            tmp_meta = self.meta_path.with_suffix(".json.tmp")
            tmp_meta.write_text(json.dumps({"generation": gen, "embedder": self.embedder_name, "count": len(mems), "dim": dim}))
            os.replace(tmp_meta, self.meta_path)
        except OSError:
            pass  # read-only location: the in-memory index still serves
        return self

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (memory ids, cosine similarities) for one normalised query vector."""
        self.ensure()
        if self.index is None or self.index.ntotal == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        q = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.index.d:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        sims, ids = self.index.search(q, min(k, self.index.ntotal))
        keep = ids[0] >= 0
        return ids[0][keep], sims[0][keep]
