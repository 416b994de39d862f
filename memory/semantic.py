"""FAISS-backed semantic memory: L2-normalised keys -> stored value vectors and source text.

This is the external (key, value) store read by HMST's kNN-memory cross-attention
(Memorizing Transformers style). Keys are hidden states; every key is L2-normalised before
it enters the index and every query before it is searched, so inner product == cosine.

Index types (``index_type``):

* ``"flat"`` (default): ``IndexIDMap2(IndexFlatIP)``. Exact search, exact deletion.
* ``"ivfpq"``: ``IndexIVFPQ`` with inner-product metric, ids stored natively in the inverted
  lists (``IndexIDMap2`` over an IVF index mis-maps ids after ``remove_ids``, so it is not
  used there). IVF-PQ needs training. Writes are buffered as exact float32 keys until
  ``train_size`` vectors have arrived (default ``39 * max(nlist, 2**nbits)``, FAISS's own
  minimum); until then search is exact over that buffer. At that point the index is trained
  once on the buffered keys, the buffer is moved into it and freed; later writes go straight
  into the index. Scores are PQ approximations of the cosine.
* ``"hnsw"``: ``IndexIDMap2(IndexHNSWFlat)`` with inner-product metric. HNSW graphs cannot
  delete, so removed ids become tombstones that search filters out with an ``IDSelector``;
  when tombstones exceed a quarter of the index (and at least 1024) the graph is rebuilt from
  the stored vectors without them.

Ids are int64, start at 0 and increase by one per written item; they are never reused, also
not after removal, eviction or a checkpoint round-trip. With ``max_items`` the oldest items are
evicted once the store is over capacity.

Values (``[value_dim]`` float32 per item) and texts live beside the index in growable
buffers ordered by id (rows are appended in id order, so an id's row is found with a
binary search). Values and search results are detached: no gradient ever flows into the
store. Search results come back on the queries' device in the queries' floating dtype.

Persistence: :meth:`state_dict` returns tensors and strings only (the index through
``faiss.serialize_index`` as a uint8 tensor, texts as a JSON string), suitable for the
Lightning checkpoint dict and ``torch.load(weights_only=True)``; :meth:`load_state_dict`
restores a store whose search results are identical.

DDP policy: every rank holds a full replica. Writes made during distributed training must go
through :meth:`replicated_add`, a collective (every rank calls it, possibly with zero rows):
it all-gathers each rank's rows (sizes first, then padded tensors, texts as UTF-8 JSON
bytes) and adds them in rank order on every rank, so the ids, values, texts and index contents
are identical everywhere. Flat search is then bit-identical across ranks. For HNSW the graph
built by FAISS's multithreaded insertion can differ between ranks (same contents, possibly
different approximate neighbours); pass ``deterministic=True`` to insert single-threaded.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from memlm.core.errors import MemLMError
from memlm.core.meter import faiss_query_cost

INDEX_TYPES = ("flat", "ivfpq", "hnsw")


@dataclass
class SearchResult:
    """Top-k neighbours for Q queries. Missing entries have id -1, score 0, zero value, mask False."""

    scores: torch.Tensor  # [Q, k] cosine similarity (approximate for ivfpq)
    ids: torch.Tensor  # [Q, k] long, -1 where missing
    values: torch.Tensor  # [Q, k, value_dim]
    mask: torch.Tensor  # [Q, k] bool, True where a neighbour was found


def _gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows] for a multi-dim index via index_select (advanced indexing with a 2-D index
    was measured 1000x slower on CPU for [1, 40] rows of a [5000, 128] table)."""
    return table.index_select(0, rows.reshape(-1)).reshape(*rows.shape, *table.shape[1:])


class _single_threaded:
    """Run FAISS single-threaded inside the block (OpenMP thread count is process-global).

    Used for small query batches: FAISS parallelises over queries, so a one-query search gains
    nothing from threads but pays the OpenMP wake-up, which on a busy machine costs far more
    than the search itself (measured: 3 ms single-threaded vs 130 ms with 2 threads for one
    query against 20k x 128 under load).
    """

    def __init__(self, torch_too: bool = False):
        self.torch_too = torch_too

    def __enter__(self):
        # read both first: torch and faiss may share one OpenMP runtime
        self.prev = faiss.omp_get_max_threads()
        self.prev_torch = torch.get_num_threads()
        faiss.omp_set_num_threads(1)
        if self.torch_too:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.torch_too:
            torch.set_num_threads(self.prev_torch)
        faiss.omp_set_num_threads(self.prev)


class _Buffer:
    """A growable row buffer (amortised O(1) append) over a torch tensor."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype):
        self.data = torch.empty((0, *row_shape), dtype=dtype)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self.data.shape[0]:
            cap = max(need, 2 * self.data.shape[0], 64)
            grown = torch.empty((cap, *self.data.shape[1:]), dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : need] = rows
        self.n = need

    def view(self) -> torch.Tensor:
        return self.data[: self.n]

    def replace(self, rows: torch.Tensor) -> None:
        self.data = rows.clone()
        self.n = rows.shape[0]


class SemanticMemory:
    """FAISS semantic store. See the module docstring for index types, ids, persistence and DDP."""

    def __init__(
        self,
        dim: int,
        value_dim: int,
        index_type: str = "flat",
        max_items: int | None = None,
        nlist: int = 256,
        m: int = 16,
        nbits: int = 8,
        hnsw_m: int = 32,
        nprobe: int = 16,
        train_size: int | None = None,
        hnsw_ef_search: int = 64,
        hnsw_ef_construction: int = 80,
        deterministic: bool = False,
        small_batch: int = 16,
        rerank: int = 0,
    ):
        if index_type not in INDEX_TYPES:
            raise MemLMError(f"unknown semantic memory index_type {index_type!r}; use one of {', '.join(INDEX_TYPES)}")
        if dim <= 0 or value_dim <= 0:
            raise MemLMError(f"semantic memory needs dim > 0 and value_dim > 0, got dim={dim}, value_dim={value_dim}")
        if index_type == "ivfpq" and dim % m != 0:
            raise MemLMError(f"ivfpq needs dim divisible by m (dim={dim}, m={m}); choose m among the divisors of dim")
        if max_items is not None and max_items <= 0:
            raise MemLMError(f"max_items must be positive or null, got {max_items}")
        self.dim = int(dim)
        self.value_dim = int(value_dim)
        self.index_type = index_type
        self.max_items = max_items
        self.nlist, self.m, self.nbits, self.hnsw_m = int(nlist), int(m), int(nbits), int(hnsw_m)
        self.nprobe = int(nprobe)
        self.train_size = int(train_size) if train_size is not None else 39 * max(self.nlist, 2**self.nbits)
        if index_type == "ivfpq" and max_items is not None:
            if max_items < max(self.nlist, 2**self.nbits):
                raise MemLMError(
                    f"ivfpq with max_items={max_items} cannot train {self.nlist} lists / {2**self.nbits} codes; "
                    "use index_type flat for a store this small, or lower nlist/nbits"
                )
            self.train_size = min(self.train_size, int(max_items))  # a bounded store must still reach training
        self.hnsw_ef_search = int(hnsw_ef_search)
        self.hnsw_ef_construction = int(hnsw_ef_construction)
        self.deterministic = bool(deterministic)
        self.small_batch = int(small_batch)  # searches of at most this many queries run FAISS single-threaded
        if rerank < 0 or (rerank and index_type != "ivfpq"):
            raise MemLMError(f"rerank={rerank}: exact re-ranking applies to index_type ivfpq only (use 0 for others)")
        self.rerank = int(rerank)
        self._reset()

    # ------------------------------------------------------------------ construction
    def config(self) -> dict:
        return dict(
            dim=self.dim, value_dim=self.value_dim, index_type=self.index_type, max_items=self.max_items,
            nlist=self.nlist, m=self.m, nbits=self.nbits, hnsw_m=self.hnsw_m, nprobe=self.nprobe,
            train_size=self.train_size, hnsw_ef_search=self.hnsw_ef_search,
            hnsw_ef_construction=self.hnsw_ef_construction, deterministic=self.deterministic,
            small_batch=self.small_batch, rerank=self.rerank,
        )

    def _new_index(self):
        if self.index_type == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.index_type == "ivfpq":
            quantizer = faiss.IndexFlatIP(self.dim)
            # faiss's Python wrapper keeps a reference to the quantizer inside the IVF object
            index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.m, self.nbits, faiss.METRIC_INNER_PRODUCT)
            index.nprobe = self.nprobe
            return index
        inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = self.hnsw_ef_construction
        inner.hnsw.efSearch = self.hnsw_ef_search
        return faiss.IndexIDMap2(inner)  # the wrapper keeps a reference to ``inner``

    def _reset(self) -> None:
        self._index = self._new_index()
        self._next_id = 0
        self._ids = _Buffer((), torch.long)  # ascending, includes dead rows until compaction
        self._values = _Buffer((self.value_dim,), torch.float32)
        # ivfpq with rerank: exact keys (float16) beside the PQ codes, aligned with the rows
        self._keys = _Buffer((self.dim,), torch.float16) if self.rerank else None
        self._alive = _Buffer((), torch.bool)
        # pinned rows (consolidated items) are never evicted by max_items: their owner (the
        # consolidator, with its own capacity) removes them
        self._pinned = _Buffer((), torch.bool)
        self._texts: list[str | None] = []
        self._n_alive = 0
        # ivfpq before training: exact keys of not-yet-indexed items
        self._pending_keys = _Buffer((self.dim,), torch.float32)
        self._pending_ids = _Buffer((), torch.long)
        # hnsw: removed ids still inside the graph
        self._tombstones: set[int] = set()
        self._search_params = None

    # ------------------------------------------------------------------ helpers
    @property
    def is_trained(self) -> bool:
        """False only for an ivfpq store still collecting its training buffer."""
        return self.index_type != "ivfpq" or self._index.is_trained

    @property
    def next_id(self) -> int:
        return self._next_id

    def __len__(self) -> int:
        return self._n_alive

    def query_cost(self, k: int = 1) -> float:
        """FLOP-equivalents of one top-``k`` search of this store as it is now (for the compute meter)."""
        trained = self.index_type != "ivfpq" or self._index.is_trained
        cost = faiss_query_cost(self.index_type, self._n_alive, self.dim, nlist=self.nlist, nprobe=self.nprobe, m=self.m,
                                nbits=self.nbits, hnsw_m=self.hnsw_m, ef_search=self.hnsw_ef_search, trained=trained)
        if self._keys is not None and trained:  # exact re-ranking of k * rerank candidates per query
            cost += 2.0 * k * self.rerank * self.dim
        return cost

    def _prep_keys(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise MemLMError(f"semantic memory {what} must be [N, {self.dim}], got {tuple(x.shape)}")
        return F.normalize(x.detach().to(device="cpu", dtype=torch.float32), dim=-1).contiguous()

    def _rows_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row index of each id and whether that id is present (alive)."""
        all_ids = self._ids.view()
        if all_ids.numel() == 0:
            return torch.zeros_like(ids), torch.zeros(ids.shape, dtype=torch.bool)
        pos = torch.searchsorted(all_ids, ids.contiguous()).clamp_max(all_ids.numel() - 1)
        found = (all_ids[pos] == ids) & self._alive.view()[pos]
        return pos, found

    def _faiss_add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        if self.deterministic:
            with _single_threaded():
                self._index.add_with_ids(keys, ids)
        else:
            self._index.add_with_ids(keys, ids)

    # ------------------------------------------------------------------ write
    def add(self, keys: torch.Tensor, values: torch.Tensor, texts: Sequence[str | None] | None = None,
            pinned: bool = False) -> torch.Tensor:
        """Store N items; returns their new ids (LongTensor[N], on CPU). ``pinned`` items are
        exempt from ``max_items`` eviction (only :meth:`remove` deletes them)."""
        k = self._prep_keys(keys, "keys")
        n = k.shape[0]
        if values.dim() != 2 or values.shape != (n, self.value_dim):
            raise MemLMError(f"semantic memory values must be [{n}, {self.value_dim}], got {tuple(values.shape)}")
        if texts is not None and len(texts) != n:
            raise MemLMError(f"semantic memory got {len(texts)} texts for {n} keys; pass one text (or None) per key")
        ids = torch.arange(self._next_id, self._next_id + n, dtype=torch.long)
        self._next_id += n
        if n == 0:
            return ids
        v = values.detach().to(device="cpu", dtype=torch.float32)
        t = list(texts) if texts is not None else [None] * n
        keep = n if self.max_items is None else min(n, self.max_items)
        if keep < n:  # a batch larger than the store: its oldest part is evicted at once
            k, v, t = k[n - keep :], v[n - keep :], t[n - keep :]
        kept_ids = ids[n - keep :]

        self._ids.append(kept_ids)
        self._values.append(v)
        if self._keys is not None:
            self._keys.append(k.half())
        self._alive.append(torch.ones(keep, dtype=torch.bool))
        self._pinned.append(torch.full((keep,), bool(pinned), dtype=torch.bool))
        self._texts.extend(t)
        self._n_alive += keep

        if self.index_type == "ivfpq" and not self._index.is_trained:
            self._pending_keys.append(k)
            self._pending_ids.append(kept_ids)
            if self._pending_ids.n >= self.train_size:
                self._train_ivfpq()
        else:
            self._faiss_add(k.numpy(), kept_ids.numpy())

        if self.max_items is not None and self._n_alive > self.max_items:
            rows = torch.nonzero(self._alive.view() & ~self._pinned.view()).squeeze(1)  # oldest unpinned first
            self.remove(self._ids.view()[rows[: self._n_alive - self.max_items]])
        return ids

    def _train_ivfpq(self) -> None:
        keys = self._pending_keys.view().numpy()
        ids = self._pending_ids.view().numpy()
        self._index.train(keys)
        self._faiss_add(keys, ids)
        self._pending_keys = _Buffer((self.dim,), torch.float32)
        self._pending_ids = _Buffer((), torch.long)

    def replicated_add(
        self, keys: torch.Tensor, values: torch.Tensor, texts: Sequence[str | None] | None = None, group=None
    ) -> torch.Tensor:
        """Collective add that keeps DDP replicas identical.

        Every rank must call it (N may differ per rank, including 0). Each rank's rows are
        gathered and added in rank order on every rank. Returns the ids of *this rank's* rows.
        Without an initialised process group (or with one rank) it is :meth:`add`.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self.add(keys, values, texts)
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        n = keys.shape[0]
        if keys.dim() != 2 or keys.shape[1] != self.dim or values.shape != (n, self.value_dim):
            raise MemLMError(
                f"replicated_add needs keys [N, {self.dim}] and values [N, {self.value_dim}], "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if texts is not None and len(texts) != n:
            raise MemLMError(f"replicated_add got {len(texts)} texts for {n} keys; pass one text (or None) per key")
        text_bytes = torch.frombuffer(
            bytearray(json.dumps(list(texts) if texts is not None else [None] * n).encode("utf-8")), dtype=torch.uint8
        )
        meta = torch.tensor([n, text_bytes.numel()], dtype=torch.long, device=dev)
        metas = [torch.zeros_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        sizes = [int(x[0]) for x in metas]
        tsizes = [int(x[1]) for x in metas]
        max_n, max_t = max(sizes), max(tsizes)
        if max_n == 0:
            return torch.empty(0, dtype=torch.long)
        kv = torch.zeros(max_n, self.dim + self.value_dim, dtype=torch.float32, device=dev)
        kv[:n, : self.dim] = keys.detach().to(dev, torch.float32)
        kv[:n, self.dim :] = values.detach().to(dev, torch.float32)
        tb = torch.zeros(max_t, dtype=torch.uint8, device=dev)
        tb[: text_bytes.numel()] = text_bytes.to(dev)
        kvs = [torch.empty_like(kv) for _ in range(world)]
        tbs = [torch.empty_like(tb) for _ in range(world)]
        dist.all_gather(kvs, kv, group=group)
        dist.all_gather(tbs, tb, group=group)
        all_kv = torch.cat([kvs[r][: sizes[r]].cpu() for r in range(world)])
        all_texts: list[str | None] = []
        for r in range(world):
            all_texts.extend(json.loads(bytes(tbs[r][: tsizes[r]].cpu().numpy()).decode("utf-8")))
        ids = self.add(all_kv[:, : self.dim], all_kv[:, self.dim :], all_texts)
        start = sum(sizes[:rank])
        return ids[start : start + n]

    def remove(self, ids) -> int:
        """Delete items by id (unknown or already removed ids are ignored). Returns how many were removed."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() == 0 or self._n_alive == 0:
            return 0
        ids = torch.unique(ids)
        rows, found = self._rows_of(ids)
        ids, rows = ids[found], rows[found]
        if ids.numel() == 0:
            return 0
        self._alive.view()[rows] = False
        self._n_alive -= ids.numel()
        id_np = ids.numpy()
        if self.index_type == "hnsw":
            self._tombstones.update(id_np.tolist())
            self._search_params = None
            if len(self._tombstones) > max(1024, self._index.ntotal // 4):
                self._rebuild_hnsw()
        elif self.index_type == "ivfpq" and not self._index.is_trained:
            pend = self._pending_ids.view()
            keep = ~torch.isin(pend, ids)
            self._pending_keys.replace(self._pending_keys.view()[keep])
            self._pending_ids.replace(pend[keep])
        else:
            self._index.remove_ids(id_np)
        dead = self._alive.n - self._n_alive
        if dead > 1024 and dead > self._alive.n // 2:
            self._compact()
        return int(ids.numel())

    def _compact(self) -> None:
        keep = self._alive.view().clone()
        idx = torch.nonzero(keep).squeeze(1).tolist()
        self._ids.replace(self._ids.view()[keep])
        self._values.replace(self._values.view()[keep])
        if self._keys is not None:
            self._keys.replace(self._keys.view()[keep])
        self._alive.replace(torch.ones(int(keep.sum()), dtype=torch.bool))
        self._pinned.replace(self._pinned.view()[keep])
        self._texts = [self._texts[i] for i in idx]

    def _rebuild_hnsw(self) -> None:
        inner = faiss.downcast_index(self._index.index)
        n = self._index.ntotal
        vecs = inner.reconstruct_n(0, n) if n else np.zeros((0, self.dim), dtype=np.float32)
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        keep = ~np.isin(ids, np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones)))
        self._index = self._new_index()
        if keep.any():
            self._faiss_add(np.ascontiguousarray(vecs[keep]), np.ascontiguousarray(ids[keep]))
        self._tombstones = set()
        self._search_params = None

    def clear(self) -> None:
        """Remove everything; ids keep increasing from where they were."""
        next_id = self._next_id
        self._reset()
        self._next_id = next_id

    # ------------------------------------------------------------------ read
    def _hnsw_params(self):
        if self._search_params is None:
            if self._tombstones:
                batch = faiss.IDSelectorBatch(np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones)))
                sel = faiss.IDSelectorNot(batch)
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=self.hnsw_ef_search)
                params._refs = (batch, sel)  # keep the selectors alive as long as the params
            else:
                params = faiss.SearchParametersHNSW(efSearch=self.hnsw_ef_search)
            self._search_params = params
        return self._search_params

    def search(self, queries: torch.Tensor, k: int) -> SearchResult:
        """Top-k by cosine for each query row. Tensors on the queries' device; no gradient."""
        if k <= 0:
            raise MemLMError(f"semantic memory search needs k >= 1, got {k}")
        q = self._prep_keys(queries, "queries")
        nq = q.shape[0]
        if self._n_alive == 0 or nq == 0:
            scores = torch.zeros(nq, k, dtype=torch.float32)
            ids = torch.full((nq, k), -1, dtype=torch.long)
        elif self.index_type == "ivfpq" and not self._index.is_trained:
            keys = self._pending_keys.view()
            sims = q @ keys.T
            kk = min(k, keys.shape[0])
            top, pos = sims.topk(kk, dim=1)
            scores = torch.zeros(nq, k, dtype=torch.float32)
            ids = torch.full((nq, k), -1, dtype=torch.long)
            scores[:, :kk] = top
            ids[:, :kk] = self._pending_ids.view()[pos]
        else:
            params = {"params": self._hnsw_params()} if self.index_type == "hnsw" else {}
            fetch = k * self.rerank if self._keys is not None else k
            if nq <= self.small_batch:
                with _single_threaded():
                    d, i = self._index.search(q.numpy(), fetch, **params)
            else:
                d, i = self._index.search(q.numpy(), fetch, **params)
            scores = torch.from_numpy(d)
            ids = torch.from_numpy(i)
            if self._keys is not None:
                if nq <= self.small_batch:  # same OpenMP wake-up cost in torch: 3 ms vs 50 ms measured
                    with _single_threaded(torch_too=True):
                        scores, ids = self._rerank(q, ids, k)
                else:
                    scores, ids = self._rerank(q, ids, k)
        rows, found = self._rows_of(ids.clamp_min(0))
        mask = (ids >= 0) & found
        ids = torch.where(mask, ids, torch.full_like(ids, -1))
        scores = torch.where(mask, scores, torch.zeros_like(scores))
        if self._values.n:
            values = torch.where(mask.unsqueeze(-1), _gather_rows(self._values.view(), rows), torch.zeros(()))
        else:
            values = torch.zeros(nq, k, self.value_dim, dtype=torch.float32)
        dtype = queries.dtype if queries.is_floating_point() else torch.float32
        dev = queries.device
        return SearchResult(
            scores=scores.to(dev, dtype), ids=ids.to(dev), values=values.to(dev, dtype), mask=mask.to(dev)
        )

    def _rerank(self, q: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact cosine over the ivfpq candidates, from the stored float16 keys; best k."""
        rows, found = self._rows_of(cand.clamp_min(0))
        found &= cand >= 0
        keys = _gather_rows(self._keys.view(), rows).float()  # [Q, kR, dim]
        exact = torch.einsum("qd,qcd->qc", q, keys).masked_fill(~found, float("-inf"))
        top, pos = exact.topk(k, dim=1)
        ids = cand.gather(1, pos)
        ok = torch.isfinite(top)
        return torch.where(ok, top, torch.zeros_like(top)), torch.where(ok, ids, torch.full_like(ids, -1))

    def get_texts(self, ids) -> list[str | None]:
        """Source text of each id (None for unknown, removed or text-less ids; -1 gives None)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() == 0:
            return []
        rows, found = self._rows_of(ids)
        return [self._texts[r] if f else None for r, f in zip(rows.tolist(), found.tolist())]

    def get_values(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(values[N, value_dim], found[N]) for the given ids; zeros where not found."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        rows, found = self._rows_of(ids)
        out = torch.zeros(ids.numel(), self.value_dim)
        out[found] = self._values.view()[rows[found]]
        return out, found

    def ids(self) -> torch.Tensor:
        """All stored ids, ascending."""
        return self._ids.view()[self._alive.view()].clone()

    def occupancy(self) -> float:
        """len / max_items; for an unbounded store log1p(len) / log1p(1e6), capped at 1."""
        if self.max_items is None:
            return min(1.0, math.log1p(self._n_alive) / math.log1p(1e6))
        return self._n_alive / self.max_items

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        alive = self._alive.view()
        idx = torch.nonzero(alive).squeeze(1).tolist()
        return {
            "config": json.dumps(self.config(), sort_keys=True),
            "index": torch.from_numpy(faiss.serialize_index(self._index).copy()),
            "ids": self._ids.view()[alive].clone(),
            "values": self._values.view()[alive].clone(),
            "keys": self._keys.view()[alive].clone() if self._keys is not None else torch.empty(0),
            "texts": json.dumps([self._texts[i] for i in idx]),
            "pinned": self._pinned.view()[alive].clone(),
            "next_id": torch.tensor(self._next_id, dtype=torch.long),
            "pending_keys": self._pending_keys.view().clone(),
            "pending_ids": self._pending_ids.view().clone(),
            "tombstones": torch.tensor(sorted(self._tombstones), dtype=torch.long),
        }

    def load_state_dict(self, state: dict) -> None:
        cfg = json.loads(state["config"]) if isinstance(state.get("config"), str) else state.get("config", {})
        for key in ("dim", "value_dim", "index_type"):
            if key in cfg and cfg[key] != getattr(self, key):
                raise MemLMError(
                    f"semantic memory checkpoint has {key}={cfg[key]} but this model uses {getattr(self, key)}; "
                    "load it with the matching model config"
                )
        self._reset()
        blob = state["index"]
        blob = blob.numpy() if isinstance(blob, torch.Tensor) else np.asarray(blob, dtype=np.uint8)
        index = faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
        if self.index_type == "ivfpq":
            index.nprobe = self.nprobe
        elif self.index_type == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.hnsw_ef_search
        self._index = index
        ids = state["ids"].to("cpu", torch.long)
        values = state["values"].to("cpu", torch.float32)
        texts = state["texts"]
        texts = json.loads(texts) if isinstance(texts, str) else list(texts)
        if values.shape != (ids.numel(), self.value_dim) or len(texts) != ids.numel():
            raise MemLMError("semantic memory checkpoint is inconsistent (ids, values and texts differ in length)")
        self._ids.replace(ids)
        self._values.replace(values)
        if self._keys is not None:
            keys = state.get("keys")
            if keys is None or keys.shape != (ids.numel(), self.dim):
                raise MemLMError("semantic memory checkpoint has no re-ranking keys; load it with rerank=0")
            self._keys.replace(keys.to("cpu", torch.float16))
        self._alive.replace(torch.ones(ids.numel(), dtype=torch.bool))
        pinned = state.get("pinned")  # absent from checkpoints before pinning: nothing pinned
        ok = pinned is not None and pinned.numel() == ids.numel()
        self._pinned.replace(pinned.to("cpu", torch.bool) if ok else torch.zeros(ids.numel(), dtype=torch.bool))
        self._texts = texts
        self._n_alive = ids.numel()
        self._next_id = int(state["next_id"])
        if "pending_keys" in state:
            self._pending_keys.replace(state["pending_keys"].to("cpu", torch.float32))
            self._pending_ids.replace(state["pending_ids"].to("cpu", torch.long))
        if "tombstones" in state:
            self._tombstones = set(state["tombstones"].tolist())
