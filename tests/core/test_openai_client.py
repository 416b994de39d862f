"""OpenAIClient against real loopback sockets (no mocks): each failure is one MemLMError line, retried when sensible."""
from __future__ import annotations

import json
import socket
import time

import pytest

from memlm.core.errors import MemLMError
from memlm.core.openai_client import OpenAIClient, OpenAIRequestError, normalise_base_url
from http_stub import JsonHandler, serving, closed_port

HELLO = [{"role": "user", "content": "hello"}]


class _Server(JsonHandler):
    mode = "ok"  # ok | error500 | error404 | garbage | no_choices
    requests: list = []

    def do_POST(self):
        body = self._read_json()
        type(self).requests.append((self.path, body))
        if self.mode == "error500":
            return self._send(500, b"")
        if self.mode == "error404":
            return self._send(404, b'{"error": {"message": "model not found"}}')
        if self.mode == "garbage":
            return self._send(200, b"<html>not json</html>")
        if self.mode == "no_choices":
            return self._send(200, b'{"id": "x"}')
        answer = "echo: " + body["messages"][-1]["content"]
        self._send(200, json.dumps({
            "id": "c", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }).encode())


@pytest.fixture()
def server():
    handler = type("Handler", (_Server,), {"mode": "ok", "requests": []})
    with serving(handler) as url:
        yield url, handler


def test_base_url_forms():
    assert normalise_base_url("http://h:1/v1/chat/completions/") == "http://h:1/v1"
    assert normalise_base_url("https://h/api/v1/embeddings") == "https://h/api/v1"
    assert normalise_base_url("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    with pytest.raises(MemLMError, match="not an http"):
        normalise_base_url("ftp://h/v1")


def test_complete_returns_text_and_fills_info(server):
    url, handler = server
    info: dict = {}
    assert OpenAIClient(url + "/v1/chat/completions", model="m").complete(HELLO, info=info) == "echo: hello"
    assert handler.requests[-1][0] == "/v1/chat/completions" and handler.requests[-1][1]["model"] == "m"
    assert info == {"finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2}


def test_connection_refused_is_one_line_fast_and_retried():
    port = closed_port()
    client = OpenAIClient(f"http://127.0.0.1:{port}", model="m", retries=2, timeout=5)
    t0 = time.perf_counter()
    with pytest.raises(OpenAIRequestError) as info:
        client.complete(HELLO)
    elapsed = time.perf_counter() - t0
    assert 0.6 <= elapsed < 5  # two back-off sleeps (0.2 s + 0.4 s), no 5 s wait
    msg = str(info.value)
    assert "\n" not in msg and f"127.0.0.1:{port}/v1" in msg and "serve.py" in msg
    assert info.value.reason.startswith("cannot connect")
    # a stream fails the same way, as soon as it is consumed
    with pytest.raises(MemLMError, match="cannot reach"):
        list(client.stream_chat(HELLO))


def test_silent_server_times_out_with_the_limit_in_the_message():
    with socket.socket() as srv:  # accepts, never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(5)
        client = OpenAIClient(f"http://127.0.0.1:{srv.getsockname()[1]}", model="m", timeout=0.5)
        t0 = time.perf_counter()
        with pytest.raises(OpenAIRequestError, match="no answer within 0.5 s") as info:
            client.complete(HELLO)
        assert time.perf_counter() - t0 < 3
        assert info.value.reason == "no answer within 0.5 s"


def test_server_errors_retry_only_when_worth_it(server):
    url, handler = server
    handler.mode = "error500"
    with pytest.raises(OpenAIRequestError, match="answered HTTP 500") as info:
        OpenAIClient(url, model="m", retries=2).complete(HELLO)
    assert info.value.reason == "HTTP 500" and len(handler.requests) == 3
    handler.mode, handler.requests[:] = "error404", []
    with pytest.raises(OpenAIRequestError, match="no model 'm'") as info:
        OpenAIClient(url, model="m", retries=2).complete(HELLO)
    assert info.value.reason == "HTTP 404: " + '{"error": {"message": "model not found"}}'
    assert len(handler.requests) == 1  # a 4xx will not change on retry


@pytest.mark.parametrize("mode", ["garbage", "no_choices"])
def test_a_non_openai_answer_is_a_memlm_error(server, mode):
    url, handler = server
    handler.mode = mode
    with pytest.raises(OpenAIRequestError, match="OpenAI") as info:
        OpenAIClient(url, model="m", retries=1).complete(HELLO)
    assert "not an OpenAI" in info.value.reason and "\n" not in str(info.value)
