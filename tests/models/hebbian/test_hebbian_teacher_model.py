"""The teacher's model name, API key and empty replies, against a real loopback HTTP server that
(like serve.py and Ollama) knows only its own model names."""
from __future__ import annotations


import pytest

from memlm.apps.hebbian_chat import run_hebbian_chat
from memlm.core.errors import MemLMError
from memlm.models.hebbian.teacher import TEACHER_API_KEY_ENV, TeacherClient, TeacherEmptyReply, TeacherUnavailable
from http_stub import JsonHandler, closed_port, serving


class _Server(JsonHandler):
    models = ["tiny-teacher"]
    answer = "the cat eats fish."
    seen: list = []

    def do_GET(self):
        type(self).seen.append(("GET", self.path, self.headers.get("Authorization"), None))
        self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    def do_POST(self):
        body = self._read_json()
        type(self).seen.append(("POST", self.path, self.headers.get("Authorization"), body.get("model")))
        if body.get("model") not in self.models:
            self._send(404, {"error": {"message": f"model {body.get('model')} not found"}})
            return
        self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
            {"index": 0, "message": {"role": "assistant", "content": self.answer}, "finish_reason": "stop"}]})


@pytest.fixture()
def server():
    handler = type("Handler", (_Server,), {"seen": []})
    with serving(handler) as url:
        yield url + '/v1', handler


def test_model_defaults_to_the_servers_first_model(server):
    url, h = server
    assert TeacherClient(url, timeout=5).ask("hi") == "the cat eats fish."
    assert [s[:2] for s in h.seen] == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
    assert h.seen[1][3] == "tiny-teacher"


def test_an_unknown_model_says_so_not_start_a_server(server):
    url, _ = server
    with pytest.raises(TeacherUnavailable) as err:
        TeacherClient(url, model="local-model", timeout=5).ask("hi")
    msg = str(err.value)
    assert "no model 'local-model'" in msg and "--teacher-model" in msg and "start" not in msg


def test_no_models_listed_is_one_line_error(server, tmp_path):
    url, h = server
    h.models = []
    with pytest.raises(MemLMError, match="cannot pick a teacher model") as err:
        run_hebbian_chat(str(tmp_path / "s.pt"), url, None, "hi", print_fn=lambda *a: None)
    assert "\n" not in str(err.value)
    dead = f"http://127.0.0.1:{closed_port()}/v1"  # nothing listens there
    with pytest.raises(MemLMError, match="cannot pick a teacher model.*unavailable"):
        run_hebbian_chat(str(tmp_path / "s.pt"), dead, None, "hi", print_fn=lambda *a: None)


def test_empty_reply_warns_and_teaches_nothing(server, tmp_path):
    url, h = server
    h.answer = "   "
    with pytest.raises(TeacherEmptyReply):
        TeacherClient(url, timeout=5).ask("hi")
    out: list[str] = []
    assert run_hebbian_chat(str(tmp_path / "s.pt"), url, None, "hello", print_fn=out.append) == 0
    assert any(line.startswith("warning: teacher at") and "empty reply" in line for line in out)


def test_api_key_from_option_then_environment(server, monkeypatch):
    url, h = server
    TeacherClient(url, model="tiny-teacher", timeout=5, api_key="sk-option").ask("hi")
    monkeypatch.setenv(TEACHER_API_KEY_ENV, "sk-env")
    TeacherClient(url, model="tiny-teacher", timeout=5).ask("hi")
    assert [s[2] for s in h.seen] == ["Bearer sk-option", "Bearer sk-env"]


def test_chat_py_passes_the_teacher_api_key(server, tmp_path, monkeypatch):
    from memlm.apps import chat

    url, h = server
    monkeypatch.delenv(TEACHER_API_KEY_ENV, raising=False)
    assert chat.main(["--learner", "hebbian", "--state", str(tmp_path / "s.pt"), "--teacher-url", url,
                      "--teacher-api-key", "sk-cli", "--prompt", "hello"]) == 0
    assert {s[2] for s in h.seen} == {"Bearer sk-cli"}


def test_teacher_speaks_first_and_interjects_lessons(server, tmp_path):
    url, h = server
    out: list[str] = []
    inputs = iter(["hello", "what is that?", "a cat", "bye"])

    def fake_input(prompt=""):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError

    assert run_hebbian_chat(str(tmp_path / "s.pt"), url, None, None, show_learning=False, input_fn=fake_input,
                            print_fn=out.append, lesson_every=2) == 0
    speakers = [line.split(">")[0] for line in out if ">" in line]
    # a lesson (teacher, learner, teacher) first, then after every 2 of the user's turns
    assert speakers[:3] == ["teacher", "hebbian", "teacher"]
    assert speakers[3:] == ["hebbian", "hebbian", "teacher", "hebbian", "teacher", "hebbian", "hebbian", "teacher",
                            "hebbian", "teacher"]
    lesson_requests = [s for s in h.seen if s[0] == "POST"]
    assert len(lesson_requests) == 3 * 2 + 4  # 2 requests per lesson, 1 per user turn
    with pytest.raises(MemLMError, match="--lesson-every"):
        run_hebbian_chat(str(tmp_path / "s.pt"), url, None, None, lesson_every=-1)
