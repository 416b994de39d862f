"""EpisodicStore: ring-buffer order and overwrite, cosine retrieval, batch == sequential, persistence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlm.core.errors import MemLMError
from memlm.memory.episodic import EpisodicStore


def test_ring_buffer_overwrites_oldest_and_keeps_order():
    store = EpisodicStore(capacity=4, state_dim=(2, 3), hidden_dim=5)
    slots = [store.add(torch.full((2, 3), float(i)), torch.randn(5), (10 * i, 10 * i + 10)) for i in range(6)]
    assert slots == [0, 1, 2, 3, 0, 1]
    assert len(store) == 4 and store.written == 6 and store.occupancy() == 1.0
    latest = store.get(store.latest(4))
    assert latest["span"].tolist() == [[20, 30], [30, 40], [40, 50], [50, 60]]
    assert latest["step"].tolist() == [2, 3, 4, 5]
    assert latest["ssm_state"].shape == (4, 2, 3)
    assert latest["ssm_state"][:, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]


def test_retrieve_ranks_by_cosine():
    g = torch.Generator().manual_seed(0)
    store = EpisodicStore(capacity=50, state_dim=8, hidden_dim=16)
    pooled = torch.randn(30, 16, generator=g)
    store.add_batch(torch.randn(30, 8, generator=g), pooled * torch.rand(30, 1, generator=g) * 5, [(i, i + 1) for i in range(30)])
    query = pooled[7] + 0.05 * torch.randn(16, generator=g)
    scores, idx = store.retrieve(query, 5)
    ref = F.normalize(pooled, dim=-1) @ F.normalize(query, dim=0)
    ref_top, ref_idx = ref.topk(5)
    assert idx[0].item() == 7 and torch.equal(idx, ref_idx)
    assert torch.allclose(scores, ref_top, atol=1e-5)
    assert torch.equal(store.get(idx)["span"][0], torch.tensor([7, 8]))
    # batched queries, and k larger than the store
    bs, bi = store.retrieve(pooled[:3], 100)
    assert bs.shape == (3, 30) and bi[:, 0].tolist() == [0, 1, 2]
    empty = EpisodicStore(4, 2, 16)
    es, ei = empty.retrieve(query, 3)
    assert es.numel() == 0 and ei.numel() == 0


def test_add_batch_equals_sequential_adds_even_when_wrapping():
    g = torch.Generator().manual_seed(1)
    states, pooled = torch.randn(11, 4, generator=g), torch.randn(11, 6, generator=g)
    spans = torch.stack([torch.arange(11), torch.arange(11) + 3], 1)
    a, b = EpisodicStore(5, 4, 6), EpisodicStore(5, 4, 6)
    for i in range(11):
        a.add(states[i], pooled[i], tuple(spans[i].tolist()))
    b.add_batch(states[:2], pooled[:2], spans[:2])
    b.add_batch(states[2:], pooled[2:], spans[2:])  # 9 > capacity: only the newest 5 survive
    for key in ("ssm_state", "pooled", "span", "step"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert len(b) == 5 and b.get(b.latest(1))["span"].tolist() == [[10, 13]]


def test_writes_are_detached_copies():
    store = EpisodicStore(3, 2, 4)
    pooled = torch.randn(4, requires_grad=True)
    state = torch.randn(2)
    store.add(state, pooled * 2, (0, 4))
    state.zero_()
    assert not store.pooled.requires_grad
    assert store.get([0])["ssm_state"].abs().sum() > 0


def test_state_dict_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(2)
    store = EpisodicStore(6, (2, 2), 8)
    store.add_batch(torch.randn(9, 2, 2, generator=g), torch.randn(9, 8, generator=g), [(i, i + 1) for i in range(9)])
    torch.save(store.state_dict(), tmp_path / "ep.pt")
    other = EpisodicStore(6, (2, 2), 8)
    other.load_state_dict(torch.load(tmp_path / "ep.pt", weights_only=True))
    q = torch.randn(8, generator=g)
    assert len(other) == 6 and other.written == 9
    assert all(torch.equal(x, y) for x, y in zip(store.retrieve(q, 4), other.retrieve(q, 4)))
    assert other.add(torch.zeros(2, 2), torch.zeros(8), (0, 0)) == store.add(torch.zeros(2, 2), torch.zeros(8), (0, 0))
    with pytest.raises(MemLMError):
        EpisodicStore(7, (2, 2), 8).load_state_dict(store.state_dict())


def test_bad_shapes_raise():
    store = EpisodicStore(3, 4, 5)
    with pytest.raises(MemLMError):
        store.add(torch.zeros(3), torch.zeros(5), (0, 1))
    with pytest.raises(MemLMError):
        store.retrieve(torch.zeros(6), 1)
    store.add(torch.zeros(4), torch.ones(5), (0, 1))
    with pytest.raises(MemLMError):
        store.get([1])
