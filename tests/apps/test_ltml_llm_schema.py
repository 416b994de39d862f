"""LTML's LLM path: one prompt with a JSON schema, sent through OpenAIClient to a real loopback server."""
from __future__ import annotations

import json

import pytest

from memlm.apps.chat_backends import OpenAIBackend
from memlm.memory.ltml.embeddings import HashEmbedder
from memlm.memory.ltml.extract import MEMORY_SCHEMA, parse_llm_items
from memlm.memory.ltml.sleep import sleep
from memlm.memory.ltml.store import Store
from http_stub import JsonHandler, serving

T0 = 1_700_000_000.0  # 2023-11-14
DAY = 86400.0
STRUCTURED = {"memories": [
    {"text": "The user's partner is Idris.", "kind": "fact", "subject": "user.partner", "value": "Idris",
     "identity": True, "importance": 8, "source": 0},
    {"text": "Answer without emojis.", "kind": "instruction", "importance": 7, "source": 1},
    {"text": "The user's parents visit tonight.", "kind": "temporary", "expires_in_days": 1, "importance": 3,
     "source": 2},
    {"text": "The user's sister lives in Ghent.", "kind": "fact", "about": "sister", "subject": "sister.home",
     "value": "Ghent", "importance": 5, "source": 3},
    {"text": "Keep recipes to the ingredients.", "kind": "lesson", "importance": 6, "source": 5},
    {"text": "Out of range.", "kind": "fact", "importance": 50},  # fails the schema: dropped, not stored
]}


class _Structured(JsonHandler):
    reply: str = json.dumps(STRUCTURED)
    requests: list = []

    def do_GET(self):
        self._send_models("llama3.1:8b")

    def do_POST(self):
        body = self._read_json()
        type(self).requests.append(body)
        self._send_chat(body["model"], type(self).reply)


@pytest.fixture()
def server():
    handler = type("Handler", (_Structured,), {"requests": [], "reply": json.dumps(STRUCTURED)})
    with serving(handler) as url:
        yield url + '/v1', handler


def _log(store):
    sid = store.start_session("test", at=T0)
    for i, (role, text) in enumerate([
        ("user", "I'm cooking for me and my partner Idris."), ("user", "remember, no emojis"),
        ("user", "my parents visit tonight"), ("user", "my sister lives in Ghent"),
        ("assistant", "Here is a long recipe with many steps ..."), ("user", "too long, just the ingredients"),
    ]):
        store.log(sid, role, text, at=T0 + i)


def test_extraction_uses_the_json_schema_and_the_validated_reply(server, tmp_path):
    url, handler = server
    store = Store(tmp_path / "m.sqlite")
    _log(store)
    stats = sleep(store, HashEmbedder(), backend=OpenAIBackend(url), now=T0 + 0.5 * DAY)
    assert stats["llm_batches"] == 1 and stats["rule_batches"] == 0
    # the first request extracts; a second one reflects on the corrected answer (its own schema)
    body = handler.requests[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == MEMORY_SCHEMA
    prompt = body["messages"][-1]["content"]
    assert "[5] user: too long, just the ingredients (written 2023-11-14)" in prompt and "lesson" in prompt
    mems = {m.text: m for m in store.memories()}
    assert "Out of range." not in mems  # failed validation
    assert mems["The user's partner is Idris."].memory_class == "identity"
    assert mems["Answer without emojis."].kind == "instruction" and mems["Answer without emojis."].memory_class == "instruction"
    temp = mems["The user's parents visit tonight."]
    assert temp.memory_class == "temporary" and temp.expires_at == pytest.approx(T0 + 2 + DAY)
    assert mems["The user's sister lives in Ghent."].person == "sister"
    assert mems["Keep recipes to the ingredients."].kind == "lesson"
    assert mems["The user's partner is Idris."].llm_importance == pytest.approx(0.8)
    store.close()


def test_a_reply_that_fails_the_schema_falls_back_to_the_rules(server, tmp_path):
    url, handler = server
    handler.reply = '{"memories": "none today"}'
    store = Store(tmp_path / "m.sqlite")
    _log(store)
    stats = sleep(store, HashEmbedder(), backend=OpenAIBackend(url), now=T0 + 0.5 * DAY)
    assert stats["llm_batches"] == 0 and stats["rule_batches"] == 1
    kinds = {m.kind for m in store.memories()}
    assert {"instruction", "lesson"} <= kinds  # the rules found "remember, no emojis" and the feedback
    assert parse_llm_items('{"memories": [{"text": "x", "kind": "fact", "importance": 0}]}') == []
    store.close()
