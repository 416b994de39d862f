"""Reflection over the assistant's own turns (issue 15): what did the user correct?

Rules by default; through a real loopback OpenAI-compatible server with the lessons' JSON
schema when a backend is given (validated; the rules take over on a bad reply)."""
from __future__ import annotations

import json

import pytest

from memlm.apps.chat_backends import OpenAIBackend
from memlm.memory.ltml.embeddings import HashEmbedder
from memlm.memory.ltml.reflect import (
    REFLECT_SCHEMA, feedback_pairs, lesson_from_feedback, parse_reflection, reflect,
)
from memlm.memory.ltml.sleep import sleep
from memlm.memory.ltml.store import Store
from http_stub import JsonHandler, serving

T0 = 1_700_000_000.0
DAY = 86400.0


def _chat(store):
    s1 = store.start_session("t", at=T0)
    for i, (role, text) in enumerate([
        ("user", "How hot does water boil up a mountain?"), ("assistant", "Water boils at 100 C everywhere."),
        ("user", "That's wrong, it's about 86 C on Everest."), ("user", "Thanks. Any soup idea?"),
        ("assistant", "- Leek soup\n- Pea soup\n- Tomato soup"), ("user", "no bullet points please"),
        ("assistant", "Try a lentil soup: onions, lentils, stock, then simmer for half an hour and blend."),
    ]):
        store.log(s1, role, text, at=T0 + i)
    store.end_session(s1, at=T0 + 60)
    s2 = store.start_session("t", at=T0 + DAY)  # the next morning, feedback opens the session
    store.log(s2, "user", "Too long, just the ingredients next time.", at=T0 + DAY)
    store.log(s2, "user", "I said I'd call my mum today.", at=T0 + DAY + 1)  # no answer before it: not feedback


def test_rules_turn_each_correction_into_a_behaviour_to_change(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    _chat(store)
    got = reflect(store)
    assert [c.kind for c in got] == ["fact", "format", "length"]
    fact, fmt, length = got
    assert "100 C everywhere" in fact.lesson and "86 C" in fact.lesson  # what was wrong and the correction
    assert fmt.lesson.startswith("Lesson: Do not use bullet points")
    assert length.lesson.startswith("Lesson: Keep answers shorter") and "lentil soup" in length.answer
    assert all(c.source == "rules" for c in got)
    assert lesson_from_feedback("meh")[1] == "other"
    store.close()


def test_feedback_that_opens_a_session_is_kept_as_a_lesson_and_survives_400_idle_days(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    _chat(store)
    sleep(store, HashEmbedder(), now=T0 + 1.5 * DAY)
    lessons = [m for m in store.memories() if m.kind == "lesson"]
    assert len(lessons) == 3 and all(m.memory_class == "instruction" for m in lessons)
    assert any("Keep answers shorter" in m.text for m in lessons)
    assert not any("call my mum" in m.text for m in lessons)
    sleep(store, HashEmbedder(), now=T0 + 400 * DAY)
    assert len([m for m in store.memories() if m.kind == "lesson"]) == 3  # protected: never decays to archive
    store.close()


class _Reflecting(JsonHandler):
    reply: str = ""
    requests: list = []

    def do_GET(self):
        self._send_models("llama3.1:8b")

    def do_POST(self):
        body = self._read_json()
        type(self).requests.append(body)
        name = (body.get("response_format") or {}).get("json_schema", {}).get("name")
        content = type(self).reply if name == "ltml_lessons" else json.dumps({"memories": []})
        self._send_chat(body["model"], content)


@pytest.fixture()
def server():
    handler = type("H", (_Reflecting,), {"requests": [], "reply": json.dumps({"lessons": [
        {"turn": 0, "lesson": "Water boils at about 86 C on Everest; boiling point falls with altitude.",
         "kind": "fact"},
        {"turn": 2, "lesson": "List only the ingredients.", "kind": "length"},
        {"turn": 9, "lesson": "Out of range, ignored."},
    ]})})
    with serving(handler) as url:
        yield url + "/v1", handler


def test_the_llm_path_uses_the_lessons_schema_and_falls_back_per_item(server, tmp_path):
    url, handler = server
    store = Store(tmp_path / "l.sqlite")
    _chat(store)
    got = reflect(store, backend=OpenAIBackend(url))
    body = handler.requests[-1]
    assert body["response_format"]["json_schema"]["schema"] == REFLECT_SCHEMA
    assert "[0] assistant: Water boils at 100 C everywhere." in body["messages"][-1]["content"]
    assert [c.source for c in got] == ["llm", "rules", "llm"]  # item 1 was left out: the rules' lesson stays
    assert "86 C on Everest; boiling point" in got[0].lesson and got[2].lesson.startswith("Lesson: List only")
    # through sleep: extraction and reflection are two requests, the lessons stored
    sleep(store, HashEmbedder(), backend=OpenAIBackend(url), now=T0 + 1.5 * DAY)
    names = [(r.get("response_format") or {}).get("json_schema", {}).get("name") for r in handler.requests]
    assert "ltml_memories" in names and names.count("ltml_lessons") >= 2
    texts = " ".join(m.text for m in store.memories() if m.kind == "lesson")
    assert "List only the ingredients" in texts and "Do not use bullet points" in texts
    store.close()


def test_a_reply_that_fails_the_schema_falls_back_to_the_rules(server, tmp_path):
    url, handler = server
    handler.reply = '{"lessons": [{"turn": "first", "lesson": "x"}]}'
    store = Store(tmp_path / "b.sqlite")
    _chat(store)
    messages = []
    got = reflect(store, backend=OpenAIBackend(url), log=messages.append)
    assert [c.source for c in got] == ["rules"] * 3 and "failed the schema" in messages[0]
    assert parse_reflection("not json", 3) is None
    assert parse_reflection('{"lessons": [{"turn": 1, "lesson": "Be brief."}]}', 3) == {1: ("Be brief.", "other")}
    assert feedback_pairs(store, after_id=10**6) == []
    store.close()


def test_the_reflect_command_prints_each_correction(tmp_path, capsys):
    from memlm.apps.ltml import main

    db = tmp_path / "c.sqlite"
    store = Store(db)
    _chat(store)
    store.close()
    assert main(["reflect", "--db", str(db), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in rows] == ["fact", "format", "length"] and all(r["source"] == "rules" for r in rows)
    assert rows[1]["lesson"].startswith("Lesson: Do not use bullet points")
    with Store(db) as s:  # read-only: reflect stores nothing (sleep does)
        assert s.memories() == []
