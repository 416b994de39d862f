import pytest
import torch

from memlm.core.errors import MemLMError
from memlm.core.meter import ComputeMeter, faiss_query_cost


def test_total_sums_flops_faiss_and_critic_costs():
    m = ComputeMeter()
    m.add_flops("lower", 1000)
    m.add_flops("upper", 500)
    m.add("faiss_queries", 3, cost_each=faiss_query_cost("flat", 10, 4))  # 2 * 10 * 4 = 80 each
    m.add("critic_calls", 2, cost_each=7)
    assert m.torch_flops == 1500
    assert m.faiss_queries == 3 and m.critic_calls == 2
    assert m.total() == 1500 + 3 * 80 + 2 * 7
    metrics = m.as_metrics()
    assert float(metrics["compute/total"]) == m.total()
    assert float(metrics["compute/flops/upper"]) == 500


def test_merge_adds_counts_and_costs():
    a, b = ComputeMeter(), ComputeMeter()
    a.add_flops("x", 10)
    b.add_flops("x", 5)
    b.add("faiss_queries", 1, cost_each=4)
    c = a + b
    assert c["flops/x"] == 15 and c.total() == 19
    assert a.total() == 10  # + does not mutate


def test_measure_matches_matmul_flops():
    m = ComputeMeter()
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    with m.measure("mm"):
        a @ b
    assert m["flops/mm"] == 2 * 3 * 5 * 7


def test_faiss_cost_by_index_type():
    assert faiss_query_cost("flat", 0, 64) == 0
    assert faiss_query_cost("flat", 1000, 64) == 2 * 1000 * 64
    # ivfpq scans codes, not vectors: far cheaper than flat on a large store, exact buffer before training
    big = 1_000_000
    assert faiss_query_cost("ivfpq", big, 64) < faiss_query_cost("flat", big, 64) / 50
    assert faiss_query_cost("ivfpq", 500, 64, trained=False) == faiss_query_cost("flat", 500, 64)
    # hnsw grows with log(n), not n
    assert faiss_query_cost("hnsw", big, 64) < faiss_query_cost("flat", big, 64) / 100
    assert faiss_query_cost("hnsw", 10, 64) <= faiss_query_cost("flat", 10, 64)
    with pytest.raises(MemLMError, match="unknown index type"):
        faiss_query_cost("lsh", 10, 4)


def test_negative_counts_are_an_error():
    with pytest.raises(MemLMError):
        ComputeMeter().add("x", -1)
