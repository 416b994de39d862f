"""The growing vocabulary: seeds, online merges, stable ids, cap, forgetting, persistence."""
from __future__ import annotations

import pytest

from memlm.models.hebbian.vocab import BOS_ID, EOS_ID, KIND_MERGED, UNK_ID, GrowingVocab
from memlm.core.errors import MemLMError


def test_starts_from_characters_and_syllables_sized_by_initial_vocab_size():
    small = GrowingVocab(initial_vocab_size=20)
    big = GrowingVocab(initial_vocab_size=150)
    assert len(small) == 20 and len(big) == 150
    assert small.units[EOS_ID] == "<eos>" and small.units[UNK_ID] == "<unk>" and small.units[BOS_ID] == "<bos>"
    assert " " in small.lookup and "e" in small.lookup  # the most frequent characters come first
    assert "th" in big.lookup and "th" not in small.lookup  # syllable-like seeds when there is room
    # fewer seeds = longer segmentations of the same text
    text = "the weather is nice"
    assert len(big.encode(text)) < len(small.encode(text, grow=True))


def test_round_trip_and_unknown_characters_grow_the_vocabulary():
    v = GrowingVocab(initial_vocab_size=64)
    text = "Zoë sagt: ÜBER 42!"
    assert v.decode(v.encode(text, grow=True)) == text
    n = len(v)
    assert v.encode("ë", grow=False) != [UNK_ID]  # it was learned above
    assert v.encode("€", grow=False) == [UNK_ID]  # unknown and not growing
    v.encode("€", grow=True)
    assert len(v) == n + 1


def test_frequent_pairs_become_units_after_merge_threshold():
    v = GrowingVocab(initial_vocab_size=100, merge_threshold=3)
    start = v.id_space
    v.observe("the cat")
    v.observe("the cat")
    assert v.id_space == start  # below threshold
    new, _ = v.observe("the cat")
    assert new, "a pair seen merge_threshold times must become a unit"
    for _ in range(10):
        v.observe("the cat")
    assert " cat" in v.lookup
    assert v.encode(" cat") == [v.lookup[" cat"]]
    # word pieces only: no unit straddles a space
    assert all(" " not in t[1:] for i, t in v.units.items() if v.kinds[i] == KIND_MERGED)


def test_ids_are_never_reused_and_cap_is_respected():
    v = GrowingVocab(initial_vocab_size=60, max_vocab_size=70, merge_threshold=2, usage_half_life=50)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    seen_ids = {}
    for rep in range(6):
        for w in words:
            v.observe(f"{w} {w} {w}")
            assert len(v) <= 70
            for i, t in v.units.items():
                assert seen_ids.setdefault(i, t) == t, "an id changed meaning"
    assert v.removed, "a full vocabulary must evict rarely used learned units"
    assert not set(v.removed) & set(v.units)
    assert v.id_space > 70  # ids keep counting past the cap


def test_forget_removes_only_rare_learned_units():
    v = GrowingVocab(initial_vocab_size=100, merge_threshold=2, usage_half_life=5)
    for _ in range(4):
        v.observe("zebra zebra")
    learned = [i for i, k in v.kinds.items() if k == KIND_MERGED]
    assert learned
    for _ in range(60):
        v.observe("the sun")
    gone = v.forget(below=0.5)
    assert set(learned) & set(gone)
    assert all(v.kinds[i] != KIND_MERGED or v.usage_of(i) >= 0.5 for i in v.units)
    assert v.decode(v.encode("zebra", grow=False)) == "zebra"  # characters remain
    with pytest.raises(MemLMError):
        v.remove(EOS_ID)


def test_json_round_trip_is_exact():
    v = GrowingVocab(initial_vocab_size=90, merge_threshold=2)
    for s in ["hello world", "hello there", "world peace"] * 3:
        v.observe(s)
    w = GrowingVocab.from_json(v.to_json())
    assert w.to_json() == v.to_json()
    assert w.encode("hello world peace") == v.encode("hello world peace")
    w.observe("again hello")
    v.observe("again hello")
    assert w.to_json() == v.to_json()
    with pytest.raises(MemLMError):
        GrowingVocab.from_json("{not json")
