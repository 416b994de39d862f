"""Consolidator: merge of near-duplicates with provenance, capacity eviction, persistence,
determinism, novelty against the semantic memory, and the capacity-0 error."""
import pytest
import torch

from memlm.core.errors import MemLMError
from memlm.memory.consolidation import Consolidator
from memlm.memory.semantic import SemanticMemory

D = 8


def episodes(keys, surprise=None, hits=None, rank=0, step0=0):
    n = keys.size(0)
    return dict(keys=keys, values=keys.clone(), surprise=torch.ones(n) if surprise is None else torch.tensor(surprise),
                hits=torch.zeros(n) if hits is None else torch.tensor(hits), rank=torch.full((n,), rank),
                step=torch.arange(step0, step0 + n), span=torch.stack([torch.arange(n) * 10, torch.arange(n) * 10 + 10], 1))


def run(c, sem, ep):
    return c.run(sem, ep["keys"], ep["values"], ep["surprise"], ep["hits"], ep["rank"], ep["step"], ep["span"])


def test_near_duplicates_merge_into_a_centroid_with_provenance():
    base = torch.eye(D)[:3]
    dup = base[0] + 0.01 * torch.eye(D)[5]
    sem = SemanticMemory(D, D)
    c = Consolidator(capacity=10, merge_threshold=0.95)
    res = run(c, sem, episodes(torch.cat([base, dup[None]])))
    assert res == {"candidates": 4, "written": 3, "merged": 1, "evicted": 0, "replayed": 0}
    assert len(sem) == 3
    merged = [i for i, p in enumerate(c.provenance) if len(p) == 2][0]
    assert sorted(p[1] for p in c.provenance[merged]) == [0, 3]  # steps of both source episodes
    assert torch.allclose(c.keys[merged], (base[0] + dup) / 2)
    # a later episode close to a consolidated item merges into it (no new item, provenance grows)
    res = run(c, sem, episodes(base[1:2] * 2.0, step0=4))
    assert res["written"] == 1 and len(c) == 3 and len(sem) == 3
    assert any(len(p) == 2 and {q[1] for q in p} == {1, 4} for p in c.provenance)


def test_capacity_evicts_the_least_important_from_semantic_memory_too():
    keys = torch.eye(D)[:5]
    sem = SemanticMemory(D, D)
    c = Consolidator(capacity=3, merge_threshold=0.99, w_frequency=0.0, w_novelty=0.0)
    run(c, sem, episodes(keys, surprise=[5.0, 1.0, 4.0, 0.5, 3.0]))
    assert len(c) == 3 and len(sem) == 3
    assert sorted(p[0][1] for p in c.provenance) == [0, 2, 4]  # the three most surprising
    # two more important newcomers push out the two weakest survivors
    run(c, sem, episodes(torch.eye(D)[5:7], surprise=[10.0, 10.0], step0=5))
    assert len(sem) == 3 and sorted(p[0][1] for p in c.provenance) == [0, 5, 6]
    assert set(sem.ids().tolist()) == set(c.ids.tolist())


def test_novelty_prefers_what_semantic_memory_does_not_hold():
    sem = SemanticMemory(D, D)
    sem.add(torch.eye(D)[:1], torch.eye(D)[:1], ["known"])
    c = Consolidator(capacity=1, merge_threshold=0.99, w_surprise=0.0, w_frequency=0.0, w_novelty=1.0)
    run(c, sem, episodes(torch.eye(D)[:2]))  # episode 0 repeats the known item, episode 1 is new
    assert [p[0][1] for p in c.provenance] == [1]


def test_same_inputs_same_result_and_state_round_trip():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(20, D, generator=g)
    keys[10:] = keys[:10] + 0.01 * torch.randn(10, D, generator=g)
    sur = torch.rand(20, generator=g).tolist()
    outs = []
    for _ in range(2):
        sem, c = SemanticMemory(D, D), Consolidator(capacity=6, merge_threshold=0.9)
        run(c, sem, episodes(keys, surprise=sur, hits=[float(i % 3) for i in range(20)]))
        outs.append((c, sem))
    (c1, s1), (c2, s2) = outs
    assert torch.equal(c1.ids, c2.ids) and torch.equal(c1.keys, c2.keys) and c1.provenance == c2.provenance
    assert s1.get_texts(s1.ids()) == s2.get_texts(s2.ids())
    c3 = Consolidator(capacity=6, merge_threshold=0.9)
    c3.load_state_dict(c1.state_dict())
    assert torch.equal(c3.ids, c1.ids) and c3.provenance == c1.provenance and c3.watermark == c1.watermark
    # episodes already consolidated are not consolidated again after a restore
    assert run(c3, s1, episodes(keys, surprise=sur))["candidates"] == 0


@pytest.mark.parametrize("cap", [0, -1, 1.5])
def test_capacity_must_be_positive(cap):
    with pytest.raises(MemLMError, match="capacity must be an integer >= 1"):
        Consolidator(capacity=cap)
