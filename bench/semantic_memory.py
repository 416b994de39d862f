"""Semantic memory (FAISS) index types: add / search throughput and recall@k against exact search.

    python bench/semantic_memory.py [--quick] [--n 100000] [--dim 256] [--k 10] [--queries 2000] [--rounds 3]

The keys imitate hidden states: a mixture of Gaussian clusters (not uniform noise), and the
queries are stored keys plus noise (the kNN-memory read pattern). Each index type is filled
with the same keys through ``SemanticMemory.add`` (IVF-PQ trains lazily inside it), then
searched with the same queries through ``SemanticMemory.search`` (the full read path the model
uses: FAISS search + value gather + tensor conversion). Search timing runs interleaved,
round by round, and the table gives ratios to the exact flat index. recall@k is the mean
overlap of the top-k ids with exact search's top-k; source@1 is how often the stored key a
query was made from comes back first (the read a kNN memory actually relies on). ``ivfpq_rerank`` is IVF-PQ fetching
``k * rerank`` candidates and re-scoring them exactly from float16 keys kept beside the codes
(index_MiB then counts those keys too). Searches of at most 16 queries run FAISS
single-threaded (see ``SemanticMemory.small_batch``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import faiss
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import MemLMError, run_main  # noqa: E402
from memlm.memory.semantic import SemanticMemory  # noqa: E402


def clustered_keys(n: int, dim: int, n_clusters: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g)
    assign = torch.randint(0, n_clusters, (n,), generator=g)
    return centers[assign] + 0.6 * torch.randn(n, dim, generator=g)


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    k = exact.shape[1]
    hits = (approx.unsqueeze(2) == exact.unsqueeze(1)) & (exact.unsqueeze(1) >= 0)
    return hits.any(2).sum().item() / (exact.shape[0] * k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12k x 128, 300 queries, 2 rounds, pq-m 16")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--value-dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096, help="rows per add() call")
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--pq-m", type=int, default=32)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-search", type=int, default=64)
    ap.add_argument("--rerank", type=int, default=16, help="ivfpq_rerank fetches k*rerank PQ candidates")
    args = ap.parse_args()
    if args.quick:
        args.n, args.dim, args.queries, args.rounds, args.pq_m = 12_000, 128, 300, 2, 16
    if args.dim % args.pq_m:
        raise MemLMError(f"--dim {args.dim} must be divisible by --pq-m {args.pq_m}")

    keys = clustered_keys(args.n, args.dim, n_clusters=max(16, args.n // 500), seed=0)
    values = torch.randn(args.n, args.value_dim, generator=torch.Generator().manual_seed(1))
    pick = torch.randint(0, args.n, (args.queries,), generator=torch.Generator().manual_seed(2))
    queries = keys[pick] + 0.3 * torch.randn(args.queries, args.dim, generator=torch.Generator().manual_seed(3))

    common = dict(dim=args.dim, value_dim=args.value_dim)
    stores = {
        "flat": SemanticMemory(**common, index_type="flat"),
        "ivfpq": SemanticMemory(**common, index_type="ivfpq", nlist=args.nlist, m=args.pq_m, nbits=8, nprobe=args.nprobe),
        "ivfpq_rerank": SemanticMemory(**common, index_type="ivfpq", nlist=args.nlist, m=args.pq_m, nbits=8,
                                       nprobe=args.nprobe, rerank=args.rerank),
        "hnsw": SemanticMemory(**common, index_type="hnsw", hnsw_m=args.hnsw_m, hnsw_ef_search=args.ef_search),
    }
    add_s = {}
    for name, store in stores.items():
        t0 = time.perf_counter()
        for i in range(0, args.n, args.batch):
            store.add(keys[i : i + args.batch], values[i : i + args.batch])
        add_s[name] = time.perf_counter() - t0
        if not store.is_trained:
            raise MemLMError(f"{name} did not train with {args.n} vectors; lower --nlist")

    results = {name: store.search(queries, args.k) for name, store in stores.items()}
    exact = results["flat"].ids
    times = {name: [] for name in stores}
    for _ in range(args.rounds):  # interleaved rounds
        for name, store in stores.items():
            t0 = time.perf_counter()
            store.search(queries, args.k)
            times[name].append(time.perf_counter() - t0)
    # single-query latency (the generation-time read): 200 queries one by one
    single = {}
    for name, store in stores.items():
        t0 = time.perf_counter()
        for i in range(min(200, args.queries)):
            store.search(queries[i : i + 1], args.k)
        single[name] = (time.perf_counter() - t0) / min(200, args.queries)

    rows, figures = [], {}
    flat_qps = args.queries / statistics.median(times["flat"])
    for name, store in stores.items():
        qps = args.queries / statistics.median(times[name])
        rec = recall_at_k(results[name].ids, exact)
        src = (results[name].ids[:, 0] == pick).float().mean().item()  # ids are 0..n-1 in write order
        state = store.state_dict()
        size_mb = (state["index"].numel() + state["keys"].numel() * 2) / 2**20  # index (+ fp16 rerank keys)
        rows.append({
            "index": name,
            "add_vec_per_s": args.n / add_s[name],
            "search_q_per_s": qps,
            "speedup_vs_flat": qps / flat_qps,
            "single_query_ms": 1e3 * single[name],
            f"recall@{args.k}": rec,
            "source@1": src,
            "index_MiB": size_mb,
        })
        figures[name] = {
            "add_vec_per_s": round(args.n / add_s[name], 1),
            "search_q_per_s": round(qps, 1),
            "speedup_vs_flat": round(qps / flat_qps, 3),
            "single_query_ms": round(1e3 * single[name], 4),
            f"recall_at_{args.k}": round(rec, 4),
            "source_at_1": round(src, 4),
            "index_MiB": round(size_mb, 2),
        }
    print(f"semantic memory: n={args.n} dim={args.dim} k={args.k} queries={args.queries} "
          f"faiss threads={faiss.omp_get_max_threads()}")
    print_table(rows)
    settings = dict(vars(args), loadavg_1m_at_end=round(os.getloadavg()[0], 2))
    print(f"(1-minute load average at the end: {settings['loadavg_1m_at_end']} on {os.cpu_count()} cores)")
    print_result(figures, settings)


if __name__ == "__main__":
    run_main(main)
