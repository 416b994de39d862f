"""LTML extraction through OpenAIBackend (and so OpenAIClient) against a real loopback server."""
from __future__ import annotations

import json

import pytest

from memlm.apps.chat_backends import OpenAIBackend
from memlm.core.errors import MemLMError
from memlm.memory.ltml.embeddings import HashEmbedder
from memlm.memory.ltml.sleep import sleep
from memlm.memory.ltml.store import Store
from http_stub import JsonHandler, serving

T0 = 1_700_000_000.0
EXTRACTED = [{"text": "The user is training for a marathon.", "kind": "fact", "subject": "user.training",
              "value": "marathon", "importance": 9, "source": 0}]


class _LLM(JsonHandler):
    fail_first = 0  # answer this many chat requests with HTTP 503 first
    requests: list = []

    def do_GET(self):
        self._send_models("extractor")

    def do_POST(self):
        body = self._read_json()
        type(self).requests.append(body)
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            return self._send(503, None)
        self._send_chat(body["model"], "Here you go: " + json.dumps(EXTRACTED))


@pytest.fixture()
def llm_server():
    handler = type("Handler", (_LLM,), {"fail_first": 0, "requests": []})
    with serving(handler) as url:
        yield url, handler


def _one_session(path, *more: str) -> Store:
    store = Store(path)
    sid = store.start_session("test", at=T0)
    for i, text in enumerate(("I'm training for the Oslo marathon.", *more)):
        store.log(sid, "user", text, at=T0 + i)
    return store


def test_sleep_extracts_through_the_openai_client_and_survives_a_503(llm_server, tmp_path):
    url, handler = llm_server
    backend = OpenAIBackend(url + "/v1/chat/completions")  # the full endpoint form works too
    assert backend.model == "extractor" and backend.base_url == url + "/v1"
    handler.fail_first = 1
    store = _one_session(tmp_path / "m.sqlite")
    stats = sleep(store, HashEmbedder(), backend=backend, now=T0 + 86400)
    assert stats["llm_batches"] == 1 and stats["rule_batches"] == 0
    (mem,) = store.memories()
    assert mem.text == "The user is training for a marathon." and mem.llm_importance == pytest.approx(0.9)
    assert len(handler.requests) == 2  # the 503 was retried
    body = handler.requests[-1]
    assert not body.get("stream") and body["temperature"] == 0.0 and body["model"] == "extractor"
    assert "[0] user: I'm training for the Oslo marathon." in body["messages"][-1]["content"]


def test_a_dead_extractor_falls_back_to_rules(llm_server, tmp_path):
    url, handler = llm_server
    backend = OpenAIBackend(url, retries=0)
    handler.fail_first = 10
    with pytest.raises(MemLMError, match="answered HTTP 503"):
        backend.chat([{"role": "user", "content": "x"}])
    store = _one_session(tmp_path / "m.sqlite", "My favourite colour is green.")
    stats = sleep(store, HashEmbedder(), backend=backend, now=T0 + 86400)
    assert stats["llm_batches"] == 0 and stats["rule_batches"] == 1
    assert "green" in [m.value for m in store.memories()]
