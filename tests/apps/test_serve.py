"""serve.py on loopback, exercised with the official ``openai`` client, and chat.py against it."""
from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from memlm.core.errors import MemLMError
from http_stub import closed_port

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-key"


def _build_tiny_checkpoint(path: Path) -> Path:
    import lightning as L

    from memlm.core.tokenizer import build_tokenizer
    from memlm.lightning_modules.language_model import OptimizerConfig
    from memlm.lightning_modules.transformer import TransformerLM

    torch.manual_seed(0)
    tok = build_tokenizer("byte")
    module = TransformerLM(vocab_size=tok.vocab_size, block_size=512, n_layer=1, n_head=2, n_embd=32,
                           optimizer=OptimizerConfig(warmup_steps=1))
    module.set_tokenizer(tok)
    text = ("User: hello\nAssistant: hello there\n" * 20).encode()
    ids = torch.tensor([tok.encode(chr(b))[0] for b in text[: 8 * 33]]).view(8, 33)
    loader = torch.utils.data.DataLoader([{"input_ids": r[:-1], "targets": r[1:]} for r in ids], batch_size=4)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(path.parent))
    trainer.fit(module, loader)
    trainer.save_checkpoint(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return _build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def backend(tiny_ckpt):
    from memlm.apps.chat_backends import LocalBackend
    from memlm.checkpoint import load_module

    return LocalBackend(load_module(tiny_ckpt), name="tiny")


@pytest.fixture(scope="module")
def server(backend):
    from memlm.apps.serve import BackgroundServer, ServerState, create_app

    state = ServerState(backend, "tiny", api_key=API_KEY, max_tokens_cap=64, max_prompt_tokens=200, default_max_tokens=16)
    srv = BackgroundServer(create_app(state))
    url = srv.start()
    yield url
    srv.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=60)


def _expected_chat(backend, messages, max_tokens=12, **kw):
    return backend.chat(messages, max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), **kw)


def test_models_lists_the_checkpoint(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny"]


def test_chat_completion_matches_local_generation(client, backend):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    want = _expected_chat(backend, messages)
    assert resp.choices[0].message.content == want
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens == backend.count_tokens(backend.render(messages, 12))
    assert 1 <= resp.usage.completion_tokens <= 12


def test_streaming_chat_yields_the_same_text_in_pieces(client, backend):
    messages = [{"role": "user", "content": "hello"}]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) >= 2  # streamed, not one blob
    assert "".join(pieces) == _expected_chat(backend, messages)
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= 1


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_text_completions_single_list_and_stream(client, backend):
    want = "".join(backend.stream_prompt("ROMEO:", max_tokens=8, temperature=0.0))
    resp = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0)
    assert resp.choices[0].text == want
    resp2 = client.completions.create(model="tiny", prompt=["ROMEO:", "JULIET:"], max_tokens=8, temperature=0)
    assert [c.index for c in resp2.choices] == [0, 1] and resp2.choices[0].text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == want


def test_embeddings_are_the_modules_pooled_states(client, backend):
    resp = client.embeddings.create(model="tiny", input=["hello world", "goodbye"])  # client asks for base64
    assert [d.index for d in resp.data] == [0, 1]
    got = np.asarray(resp.data[0].embedding, dtype=np.float32)
    want = backend.module.embed(backend.tokenizer.encode("hello world")).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert abs(np.linalg.norm(got) - 1.0) < 1e-4
    # plain float format over raw HTTP, token-id input
    r = httpx.post(f"{client.base_url}embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "tiny", "input": [5, 6, 7], "encoding_format": "float"})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], backend.module.embed([5, 6, 7]).numpy(), rtol=1e-5, atol=1e-6)
    b64 = httpx.post(f"{client.base_url}embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": "tiny", "input": "hello world", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, want, rtol=1e-5, atol=1e-6)


def test_bad_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.status_code == 401
    assert httpx.get(f"{server}/models").status_code == 401  # no key at all


def test_limits_give_openai_style_4xx(client, server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=65)
    assert exc.value.status_code == 400 and "max_tokens" in exc.value.message
    assert exc.value.body["code"] == "max_tokens_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 100}], max_tokens=4)
    assert exc.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert exc.value.status_code == 404 and exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=5)
    r = httpx.post(f"{server}/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_requests_all_get_their_own_answer(server, backend):
    prompts = [f"question number {i}" for i in range(6)]
    want = {p: _expected_chat(backend, [{"role": "user", "content": p}], max_tokens=10) for p in prompts}
    got: dict[str, str] = {}
    errors: list[BaseException] = []

    def ask(p: str, stream: bool) -> None:
        try:
            c = openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=60)
            kw = dict(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0)
            if stream:
                got[p] = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                                 if ch.choices)
            else:
                got[p] = c.chat.completions.create(**kw).choices[0].message.content
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(p, i % 2 == 0)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert got == want


def test_server_with_ltml_memory_injects_and_logs(tmp_path, backend):
    from memlm.memory.ltml.embeddings import HashEmbedder
    from memlm.apps.ltml_session import LTMLMemory
    from memlm.memory.ltml.store import Store
    from memlm.apps.serve import BackgroundServer, ServerState, create_app

    db = tmp_path / "mem.sqlite"
    store = Store(db)
    sid = store.start_session("seed")
    store.log(sid, "user", "My favourite colour is teal.")
    store.close()
    memory = LTMLMemory(str(db), embedder=HashEmbedder(), backend=backend, count_tokens=backend.count_tokens)
    memory.sleep()
    state = ServerState(backend, "tiny", max_tokens_cap=32, max_prompt_tokens=2000, memory=memory)
    srv = BackgroundServer(create_app(state))
    url = srv.start()
    try:
        r = httpx.post(f"{url}/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "what is my favourite colour?"}],
            "max_tokens": 4, "temperature": 0, "user": "alice"}, timeout=60)
        assert r.status_code == 200, r.text
        injected = r.json()["ltml"]["injected"]
        assert injected and "teal" in injected[0]["text"]
        assert r.headers["x-ltml-injected"].split(",")[0] == str(injected[0]["id"])
        with httpx.stream("POST", f"{url}/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "my favourite colour?"}], "max_tokens": 2,
                "stream": True}, timeout=60) as streamed:
            assert streamed.headers["x-ltml-injected"] == r.headers["x-ltml-injected"]
            assert streamed.read().decode().rstrip().endswith("data: [DONE]")
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "I live in Oslo."}], max_tokens=4,
                                  temperature=0, user="alice")
        logged = [row[3] for row in memory.store.interactions()]
        assert "what is my favourite colour?" in logged and "I live in Oslo." in logged
        stats = memory.sleep()
        assert stats["added"] >= 1
        assert any("Oslo" in m.text for m in memory.store.memories())
    finally:
        srv.stop()
        memory.close()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow  # two fresh interpreters importing torch + lightning: ~15 s idle, more on a busy machine
def test_serve_cli_and_chat_cli_talk_over_loopback(tiny_ckpt, backend):
    """The real entry points as a user runs them: serve.py in one process, chat.py in another."""
    port = closed_port()  # free now: the server under test binds it
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(tiny_ckpt), "--port", str(port),
                             "--api-key", API_KEY, "--model-name", "tiny"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("serve.py did not come up: " + (proc.stdout.read() if proc.poll() is not None else ""))
        out = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--base-url", url, "--api-key", API_KEY,
                              "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "12"],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout == _expected_chat(backend, [{"role": "user", "content": "hello"}]) + "\n"
        from memlm.apps import chat

        with pytest.raises(MemLMError, match="API key"):
            chat.main(["--base-url", url, "--api-key", "nope", "--prompt", "hello"])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_chat_local_checkpoint_prompt_loop_memory_and_errors(tiny_ckpt, backend, tmp_path, capsys, monkeypatch):
    from memlm.apps import chat

    want = "".join(backend.stream_prompt("ROMEO:", max_tokens=10, temperature=0.0))
    assert chat.main(["--ckpt", str(tiny_ckpt), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == want + "\n"
    # interactive loop with memory: two turns, 'quit', consolidation on exit
    db = tmp_path / "chat.sqlite"
    monkeypatch.setattr(sys, "stdin", io.StringIO("I have a cat named Miso.\nwhat is my cat called?\nquit\nnever read\n"))
    assert chat.main(["--ckpt", str(tiny_ckpt), "--memory", str(db), "--embedder", "hash", "--explain",
                      "--max-new-tokens", "4", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "[memory]" in err and "slept" in err
    from memlm.memory.ltml.store import Store

    with Store(db) as s:
        texts = [r[3] for r in s.interactions()]
        assert "never read" not in texts and "I have a cat named Miso." in texts
        assert any("Miso" in m.text for m in s.memories())
    # a second session sees the memory injected
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is my cat called?\nquit\n"))
    assert chat.main(["--ckpt", str(tiny_ckpt), "--memory", str(db), "--embedder", "hash", "--explain",
                      "--max-new-tokens", "2", "--no-sleep-on-exit"]) == 0
    assert "The user has a cat named Miso." in capsys.readouterr().err
    with pytest.raises(MemLMError, match="cannot reach"):
        chat.main(["--base-url", f"http://127.0.0.1:{closed_port()}", "--prompt", "x"])
    with pytest.raises(MemLMError, match="nothing to chat with"):
        chat.main([])
    # user errors through the real entry point: one 'error:' line, exit code 2
    missing = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--ckpt", str(tmp_path / "nope.ckpt"), "--prompt", "x"],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'nope.ckpt'}"


def test_chat_learner_hebbian_dispatches_lazily(monkeypatch):
    import types

    from memlm.apps import chat

    calls = []
    fake = types.ModuleType("memlm.apps.hebbian_chat")
    fake.run_hebbian_chat = lambda state, url, model, prompt: calls.append((state, url, model, prompt)) or 0
    monkeypatch.setitem(sys.modules, "memlm.apps.hebbian_chat", fake)
    assert chat.main(["--learner", "hebbian", "--teacher-url", "http://127.0.0.1:1/v1", "--teacher-model", "t",
                      "--prompt", "hi"]) == 0
    assert calls == [(os.path.expanduser("~/.memlm/hebbian_state.pt"), "http://127.0.0.1:1/v1", "t", "hi")]


def test_ltml_embedders_over_the_server_and_the_checkpoint(server, backend):
    from memlm.memory.ltml.embeddings import get_embedder

    remote = get_embedder("openai", base_url=server, api_key=API_KEY)
    local = get_embedder("module", module=backend.module)
    assert remote.name == "openai:tiny" and local.name == "ckpt:memlm" and remote.dim == local.dim == 32
    texts = ["I live in Oslo.", "my cat is Miso"]
    np.testing.assert_allclose(remote.encode(texts), local.encode(texts), rtol=1e-4, atol=1e-5)


def test_chat_with_remote_backend_and_memory_falls_back_to_rules(server, tmp_path, capsys):
    from memlm.apps import chat

    db = tmp_path / "remote.sqlite"
    # the tiny server cannot follow the extraction prompt (and caps max_tokens): sleep must still consolidate
    assert chat.main(["--base-url", server, "--api-key", API_KEY, "--memory", str(db), "--embedder", "hash",
                      "--prompt", "I live in Oslo.", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    from memlm.memory.ltml.store import Store

    with Store(db) as s:
        assert [m.value for m in s.memories()] == ["Oslo"]
        (run,) = s.conn.execute("SELECT stats FROM sleep_runs").fetchall()
        assert '"rule_batches": 1' in run[0]
    assert "LLM extraction failed" in capsys.readouterr().err
