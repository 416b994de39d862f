"""ConversationDataModule: dialogue JSONL (both shapes), plain text, builtin grammar, clear errors."""
from __future__ import annotations

import json

import pytest

from memlm.datamodules.conversation import TURN_SEPARATOR, ConversationDataModule, builtin_items, split_utterances
from memlm.core.errors import MemLMError


def test_jsonl_shapes_become_dialogue_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([
        json.dumps({"user": "hi", "assistant": "hello!"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                                 {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]}),
        json.dumps({"text": "just a sentence"}),
    ]), encoding="utf-8")
    dm = ConversationDataModule(source=str(path), val_fraction=0.0, batch_size=2)
    assert dm.split("train") == [f"hi{TURN_SEPARATOR}hello!", f"q1{TURN_SEPARATOR}a1{TURN_SEPARATOR}q2", "just a sentence"]
    batches = list(dm.train_dataloader())
    assert batches[0] == [f"hi{TURN_SEPARATOR}hello!", f"q1{TURN_SEPARATOR}a1{TURN_SEPARATOR}q2"]
    assert all(isinstance(b, list) and all(isinstance(x, str) for x in b) for b in batches)


def test_plain_text_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  second   line  \n" + "word. " * 80, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"user": "u", "assistant": "a"}) + "\n", encoding="utf-8")
    items = ConversationDataModule(source=str(tmp_path), val_fraction=0.0).split("train")
    assert items[:2] == ["first line", "second line"]
    assert all(len(x) <= 300 for x in items)
    assert items[-1] == f"u{TURN_SEPARATOR}a"
    assert split_utterances("a\nb") == ["a", "b"]


def test_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "x", "assistant": "y"}\n{broken\n', encoding="utf-8")
    with pytest.raises(MemLMError, match=r"bad.jsonl:2 is not valid JSON"):
        ConversationDataModule(source=str(bad)).setup()
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "x"}\n', encoding="utf-8")
    with pytest.raises(MemLMError, match="none of the keys"):
        ConversationDataModule(source=str(odd)).setup()
    with pytest.raises(MemLMError, match="not found"):
        ConversationDataModule(source=str(tmp_path / "missing.jsonl")).setup()
    with pytest.raises(MemLMError, match="val_fraction"):
        ConversationDataModule(val_fraction=1.5)


def test_builtin_corpus_is_offline_deterministic_and_consistent():
    a, b = builtin_items(300, seed=0), builtin_items(300, seed=0)
    assert a == b and builtin_items(300, seed=1) != a
    dialogues = [x for x in a if TURN_SEPARATOR in x]
    assert len(dialogues) > 100
    # the world's facts never change: a question always gets the same answer
    answers = {}
    for d in dialogues:
        q, r = d.split(TURN_SEPARATOR)
        if q.startswith("what does the"):
            assert answers.setdefault(q, r) == r
    dm = ConversationDataModule(source="builtin", builtin_items=200, val_fraction=0.1)
    assert len(dm.split("val")) == 20 and len(dm.split("train")) == 180
    assert dm.vocab_size == 2048 and dm.tokenizer is None
    assert len(ConversationDataModule(source="pydoc", max_items=50).split("train")) > 40
