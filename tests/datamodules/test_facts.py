import pytest

from memlm.core.errors import MemLMError
from memlm.datamodules.facts import RELATIONS, Fact, make_facts, name_split


def test_deterministic_given_seed_and_different_across_seeds():
    assert make_facts(50, 3) == make_facts(50, 3)
    assert make_facts(50, 3) != make_facts(50, 4)


def test_fact_fields_are_consistent():
    facts = make_facts(60, 0)
    assert {f.relation for f in facts} == set(RELATIONS)
    for f in facts:
        assert isinstance(f, Fact)
        assert f.answer == f.value
        assert f.subject in f.text and f.value in f.text and f.subject in f.question
        assert f.value not in f.question
        statement, question, _ = RELATIONS[f.relation]
        assert f.text == statement.format(s=f.subject, v=f.value)
        assert f.question == question.format(s=f.subject)
    assert len({f.subject for f in facts}) == len(facts)  # one answer per question


def test_train_and_eval_names_and_values_are_disjoint():
    train = make_facts(400, 0, "train") + make_facts(400, 1, "train")
    held = make_facts(400, 0, "eval")
    train_words = {f.subject for f in train} | {f.value for f in train}
    eval_words = {f.subject for f in held} | {f.value for f in held}
    assert not train_words & eval_words
    assert all(name_split(f.subject) == "eval" for f in held)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(MemLMError, match="split"):
        make_facts(3, 0, "test")
    with pytest.raises(MemLMError, match="integer"):
        make_facts(-1, 0)
    assert make_facts(0, 0) == []


def test_cloze_prompt_ends_with_the_statement_up_to_its_value():
    for f in make_facts(12, 3):
        assert f.text.startswith(f.cloze) and f.text[len(f.cloze):].strip().startswith(f.value)
        assert f.prompt("question") == f.question
        assert f.prompt() == f"{f.question} {f.cloze}" and f.prompt().endswith((" is", " the", " named"))
    with pytest.raises(MemLMError, match="prompt style must be one of cloze, question"):
        make_facts(1, 0)[0].prompt("essay")
