"""Stage-4 critic triples: labels, the three corruptions, held-out entities, determinism, encoding."""
from __future__ import annotations

import pytest
import torch

from memlm.core.errors import MemLMError
from memlm.core.tokenizer import build_tokenizer
from memlm.datamodules.critic_data import encode_examples, make_critic_examples
from memlm.datamodules.facts import make_facts


def test_triples_have_one_positive_and_one_corruption_per_fact():
    facts = make_facts(60, seed=3)
    ex = make_critic_examples(60, seed=3)
    assert len(ex) == 120 and sum(x.label for x in ex) == 60
    by_kind = {}
    for x in ex:
        by_kind.setdefault(x.kind, []).append(x)
    assert set(by_kind) == {"correct", "swapped_entity", "wrong_number", "unsupported"}
    by_question = {f.question: f for f in facts}
    for x in by_kind["correct"]:
        f = by_question[x.query]
        assert x.label == 1 and x.response == f.value and f.text in x.facts
    for x in by_kind["swapped_entity"]:
        f = by_question[x.query]
        # the wrong value is in the facts (bound to another subject), the true fact too
        assert x.label == 0 and x.response != f.value and x.response in x.facts and f.text in x.facts
    for x in by_kind["wrong_number"]:
        f = by_question[x.query]
        assert x.label == 0 and f.relation == "age" and x.response.isdigit() and x.response != f.value
        assert 1 <= abs(int(x.response) - int(f.value)) <= 9
    for x in by_kind["unsupported"]:
        f = by_question[x.query]
        assert x.label == 0 and x.response == f.value and f.subject not in x.facts


def test_held_out_triples_use_held_out_entities_and_are_deterministic():
    train = make_critic_examples(80, seed=1, split="train")
    held = make_critic_examples(80, seed=1, split="eval")
    train_subjects = {f.subject for f in make_facts(80, 1, "train")}
    held_subjects = {f.subject for f in make_facts(80, 1, "eval")}
    assert not train_subjects & held_subjects
    assert not any(s in x.facts for x in held for s in train_subjects)
    assert make_critic_examples(80, seed=1, split="eval") == held
    assert make_critic_examples(80, seed=2, split="eval") != held
    with pytest.raises(MemLMError, match="at least 3 facts"):
        make_critic_examples(2, seed=0)


def test_encoding_pads_each_part_with_the_pad_id():
    tok = build_tokenizer("byte")
    ex = make_critic_examples(4, seed=0)
    batch = encode_examples(ex, tok, pad_id=-1)
    assert batch["labels"].tolist() == [float(x.label) for x in ex]
    for i, x in enumerate(ex):
        row = batch["response_ids"][i]
        n = len(tok.encode(" " + x.response))
        assert tok.decode(row[:n].tolist()) == " " + x.response and (row[n:] == -1).all()
        assert tok.decode([t for t in batch["fact_ids"][i].tolist() if t >= 0]) == x.facts
    assert batch["query_ids"].dtype == torch.long


def test_statement_responses_and_same_relation_swaps():
    plain = make_critic_examples(60, 3, "train")
    ex = make_critic_examples(60, 3, "train", response="statement", same_relation_swaps=True)
    facts = {f.question: f for f in make_facts(60, 3, "train")}
    assert len(ex) == len(plain)
    saw_age = saw_swap = 0
    for x in ex:
        f = facts[x.query]
        if x.kind == "correct" and f.relation == "age":  # the statement's rest, as a cloze is completed
            assert x.response == f"{f.value} years old" and x.label == 1
            saw_age += 1
        if x.kind == "wrong_number":
            assert x.response.endswith(" years old") and x.response.split()[0] != f.value
        if x.kind == "swapped_entity":  # another subject's value of the same relation, in the context
            other = [g for g in facts.values() if g.relation == f.relation and g.value == x.response and g is not f]
            assert other and other[0].text in x.facts and f.text in x.facts
            saw_swap += 1
    assert saw_age and saw_swap
    # the bare-value default differs only in the responses' form
    assert [x.kind for x in plain if x.kind != "swapped_entity"] == [x.kind for x in ex if x.kind != "swapped_entity"]
    with pytest.raises(MemLMError):
        make_critic_examples(10, 0, "train", response="essay")


def test_single_fact_contexts():
    facts = {f.question: f for f in make_facts(80, 4, "train")}
    base = make_critic_examples(80, 4, "train")
    ex = make_critic_examples(80, 4, "train", single_fact=0.5)
    assert [(x.query, x.response, x.label, x.kind) for x in ex] == [(x.query, x.response, x.label, x.kind) for x in base]
    alone = [x for x in ex if x.facts.count(".") == 1]
    assert 0.3 * len(ex) < len(alone) < 0.7 * len(ex)
    for x in alone:
        f = facts[x.query]
        if x.kind in ("correct", "wrong_number"):
            assert x.facts == f.text  # the subject's own fact
        else:
            assert f.subject not in x.facts  # another subject's fact
            if x.kind == "swapped_entity":
                assert x.response in x.facts
    assert all(x.facts.count(".") == 2 for x in make_critic_examples(80, 4, "train", single_fact=0.0))
    with pytest.raises(MemLMError):
        make_critic_examples(10, 0, "train", single_fact=1.5)
