"""ComputeMeter: what a forward actually ran, in FLOP-equivalents.

A meter holds named counts and, for each, its cost in FLOP-equivalents:

* ``flops/<part>``: torch FLOPs of one part of the model (``flops/lower``, ``flops/ssm``, ...),
  counted exactly by the model from the shapes it really ran (one multiply-add = 2 FLOPs,
  the convention of ``torch.utils.flop_counter.FlopCounterMode``; tests check the count
  against that mode), or measured with :meth:`ComputeMeter.measure`;
* ``faiss_queries``: semantic-memory searches, each costing :func:`faiss_query_cost` for the
  index type and size that answered it;
* ``critic_calls``: critic scorings, each costing the critic's own FLOPs.

``total()`` sums the costs, so "semantic off" is cheaper by the FAISS work it skipped as well
as by the reader's FLOPs. Counts are plain Python floats: adding them never syncs a device.
The RL reward reads ``total()``; logs read :meth:`as_metrics`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from memlm.core.errors import MemLMError

FLOPS_PREFIX = "flops/"
FAISS_QUERIES = "faiss_queries"
CRITIC_CALLS = "critic_calls"


def faiss_query_cost(index_type: str, n_items: int, dim: int, *, nlist: int = 256, nprobe: int = 16, m: int = 8,
                     nbits: int = 8, hnsw_m: int = 32, ef_search: int = 64, trained: bool = True) -> float:
    """FLOP-equivalents of one top-k query (2 per multiply-add of a distance computation).

    flat: one dot product per stored item. ivfpq: the coarse quantizer over ``nlist``
    centroids, the ``m x 2**nbits`` distance table, then ``m`` table look-ups per code in the
    ``nprobe`` probed lists (an untrained ivfpq store searches its exact buffer, as flat).
    hnsw: about ``ef_search`` candidates expanded, ``hnsw_m`` neighbours each, one dot product
    per neighbour, capped by the store size.
    """
    n = max(0, int(n_items))
    if n == 0:
        return 0.0
    if index_type == "flat" or (index_type == "ivfpq" and not trained):
        return 2.0 * n * dim
    if index_type == "ivfpq":
        coarse = 2.0 * nlist * dim
        table = 2.0 * (2**nbits) * dim  # m sub-tables of 2**nbits codes x dim/m each
        scan = float(m) * min(n, math.ceil(nprobe * n / max(nlist, 1)))
        return coarse + table + scan
    if index_type == "hnsw":
        visited = min(n, ef_search * hnsw_m + hnsw_m * max(1, math.ceil(math.log2(n + 1))))
        return 2.0 * visited * dim
    raise MemLMError(f"unknown index type {index_type!r} for the compute meter; use flat, ivfpq or hnsw")


class ComputeMeter:
    """Named counts and their FLOP-equivalent costs. See the module docstring."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self.costs: dict[str, float] = {}

    # -- recording -------------------------------------------------------------------------------
    def add(self, name: str, count: float = 1.0, cost_each: float = 0.0) -> "ComputeMeter":
        """Record ``count`` events of ``name``, each costing ``cost_each`` FLOP-equivalents."""
        if count < 0 or cost_each < 0:
            raise MemLMError(f"compute meter counts and costs must be >= 0, got {name}: {count} x {cost_each}")
        self.counts[name] = self.counts.get(name, 0.0) + float(count)
        self.costs[name] = self.costs.get(name, 0.0) + float(count) * float(cost_each)
        return self

    def add_flops(self, part: str, flops: float) -> "ComputeMeter":
        """Torch FLOPs of one model part (recorded as ``flops/<part>``)."""
        return self.add(FLOPS_PREFIX + part, flops, 1.0)

    @contextmanager
    def measure(self, part: str) -> Iterator[None]:
        """Count the torch FLOPs of the enclosed code with FlopCounterMode (slow: for tests and
        one-off measurements, not the training hot path)."""
        from torch.utils.flop_counter import FlopCounterMode

        mode = FlopCounterMode(display=False)
        with mode:
            yield
        self.add_flops(part, float(mode.get_total_flops()))

    def merge(self, other: "ComputeMeter") -> "ComputeMeter":
        for name, count in other.counts.items():
            self.counts[name] = self.counts.get(name, 0.0) + count
            self.costs[name] = self.costs.get(name, 0.0) + other.costs.get(name, 0.0)
        return self

    def __add__(self, other: "ComputeMeter") -> "ComputeMeter":
        return ComputeMeter().merge(self).merge(other)

    # -- reading ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> float:
        return self.counts.get(name, 0.0)

    def get(self, name: str, default: float = 0.0) -> float:
        return self.counts.get(name, default)

    @property
    def torch_flops(self) -> float:
        return sum(v for k, v in self.counts.items() if k.startswith(FLOPS_PREFIX))

    @property
    def faiss_queries(self) -> float:
        return self.counts.get(FAISS_QUERIES, 0.0)

    @property
    def critic_calls(self) -> float:
        return self.counts.get(CRITIC_CALLS, 0.0)

    def total(self) -> float:
        """Everything that ran, in FLOP-equivalents."""
        return sum(self.costs.values())

    def as_metrics(self, prefix: str = "compute/") -> dict[str, torch.Tensor]:
        """Scalar tensors for logging: the total, torch FLOPs, FAISS queries, critic calls and each part."""
        out = {f"{prefix}total": self.total(), f"{prefix}torch_flops": self.torch_flops,
               f"{prefix}faiss_queries": self.faiss_queries, f"{prefix}critic_calls": self.critic_calls}
        for name, count in self.counts.items():
            if name.startswith(FLOPS_PREFIX):
                out[f"{prefix}{name}"] = count
        return {k: torch.tensor(float(v)) for k, v in out.items()}

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "costs": dict(self.costs), "total": self.total()}

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.counts.items()))
        return f"ComputeMeter(total={self.total():.4g}; {parts})"
