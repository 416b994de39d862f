"""The teacher client against real OpenAI-compatible HTTP servers on loopback (no mocks)."""
from __future__ import annotations

import json
import socket
import time

import pytest

from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig
from memlm.models.hebbian.teacher import TeacherClient, TeacherUnavailable
from memlm.core.openai_client import normalise_base_url
from memlm.core.errors import MemLMError
from http_stub import JsonHandler, closed_port, serving

ANSWERS = {"what does the cat eat?": "the cat eats fish.", "hello": "hello! how are you?"}


class _Teacher(JsonHandler):
    mode = "ok"  # ok | error500 | garbage
    requests: list = []

    def do_POST(self):
        body = self._read_json()
        type(self).requests.append((self.path, body))
        if self.mode == "error500":
            self.send_response(500)
            self.end_headers()
            return
        if self.mode == "garbage":
            payload = b"<html>not json</html>"
        else:
            question = body["messages"][-1]["content"]
            answer = ANSWERS.get(question, "i do not know.")
            payload = json.dumps({
                "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def teacher_server():
    handler = type("Handler", (_Teacher,), {"mode": "ok", "requests": []})
    with serving(handler) as url:
        yield url, handler


def test_url_normalisation():
    # the teacher shares the one client's normaliser: every form reaches the same /v1 base
    assert normalise_base_url("http://localhost:1234/v1/chat/completions") == "http://localhost:1234/v1"
    assert normalise_base_url("http://localhost:11434/v1") == "http://localhost:11434/v1"
    assert normalise_base_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/v1"
    assert TeacherClient("http://localhost:1234/v1/chat/completions/").url == "http://localhost:1234/v1"
    assert normalise_base_url("localhost:1234") == "http://localhost:1234/v1"  # scheme-less host:port is http
    with pytest.raises(MemLMError):
        TeacherClient("ftp://localhost:1234/v1")


@pytest.mark.parametrize("form", ["", "/v1", "/v1/", "/v1/chat/completions"])
def test_every_url_form_posts_to_chat_completions(teacher_server, form):
    base, handler = teacher_server
    client = TeacherClient(f"{base}{form}", model="tiny-teacher", timeout=5)
    assert client.ask("hello") == "hello! how are you?"
    assert handler.requests[-1][0] == "/v1/chat/completions"


def test_client_talks_to_a_real_server(teacher_server):
    base, handler = teacher_server
    url = f"{base}/v1"
    client = TeacherClient(url, model="tiny-teacher", timeout=5)
    assert client.ask("what does the cat eat?") == "the cat eats fish."
    path, body = handler.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["model"] == "tiny-teacher" and body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {"role": "user", "content": "what does the cat eat?"}


def test_learner_learns_the_teachers_answer(teacher_server):
    base, handler = teacher_server
    cfg = LearnerConfig(seed=0, temperature=0.0, teacher_api_url=f"{base}",
                        teacher_model="tiny-teacher", teacher_timeout=5)
    learner = ContinualLearner(cfg)
    first = learner.process_input_and_respond("what does the cat eat?")
    assert first != "the cat eats fish."  # a blank learner cannot know yet
    assert learner.last_turn["teacher_reply"] == "the cat eats fish."
    for _ in range(5):
        learner.process_input_and_respond("what does the cat eat?")
        learner.process_input_and_respond("hello")
    assert learner.process_input_and_respond("what does the cat eat?") == "the cat eats fish."
    assert learner.process_input_and_respond("hello") == "hello! how are you?"
    assert len(handler.requests) == 13
    # learn_from_teacher=False: the teacher is asked but its answer is not learned
    quiet = ContinualLearner(LearnerConfig(**{**cfg.to_dict(), "learn_from_teacher": False}))
    for _ in range(6):
        quiet.process_input_and_respond("hello")
    assert quiet.process_input_and_respond("hello") != "hello! how are you?"


def test_teacher_down_is_clear_fast_and_learning_goes_on():
    port = closed_port()
    learner = ContinualLearner(LearnerConfig(seed=0, temperature=0.0, teacher_api_url=f"http://127.0.0.1:{port}/v1",
                                             teacher_timeout=1.0, teacher_retries=1))
    t0 = time.perf_counter()
    for _ in range(10):
        before = learner.net.weights.clone()
        learner.process_input_and_respond("the cat sat on the mat")
        assert learner.net.weights.shape[0] >= before.shape[0]
        assert learner.last_turn["weight_change"] > 0
    assert time.perf_counter() - t0 < 15
    msg = learner.last_teacher_error
    assert msg and f"127.0.0.1:{port}" in msg and "unavailable" in msg and "keeps learning" in msg
    assert learner.respond("the cat sat on the", temperature=0) == "mat"
    with pytest.raises(TeacherUnavailable):
        learner.teacher.ask("hi")


def test_server_errors_and_bad_answers_raise_teacher_unavailable(teacher_server):
    base, handler = teacher_server
    url = f"{base}/v1/chat/completions"
    handler.mode = "error500"
    client = TeacherClient(url, model="tiny-teacher", timeout=2, retries=2)  # this server has no /v1/models
    with pytest.raises(TeacherUnavailable, match="HTTP 500"):
        client.ask("hello")
    assert len(handler.requests) == 3  # first try + 2 retries
    handler.mode = "garbage"
    with pytest.raises(TeacherUnavailable, match="not an OpenAI"):
        TeacherClient(url, model="tiny-teacher", timeout=2, retries=0).ask("hello")


def test_timeout_is_short_and_reported():
    # a socket that accepts but never answers
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(5)
        port = srv.getsockname()[1]
        client = TeacherClient(f"http://127.0.0.1:{port}", timeout=0.5, retries=0)
        t0 = time.perf_counter()
        with pytest.raises(TeacherUnavailable, match="no answer within"):
            client.ask("hello")
        assert time.perf_counter() - t0 < 5
