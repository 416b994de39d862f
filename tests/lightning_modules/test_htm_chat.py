"""HTM as a chatting sequence learner: replies that depend on the prompt, the same answer through
serve.py as through chat.py, online learning in chat, the learned-state file and embed()."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memlm.apps.chat_backends import LocalBackend, format_chat
from memlm.core.errors import MemLMError
from memlm.core.tokenizer import build_tokenizer
from memlm.lightning_modules.htm.module import HTMLanguageModel

DIALOGUES = [
    ("hello, who are you?", "i am a small htm model."),
    ("what does the print function do?", "it writes text to the screen."),
    ("tell me about lists", "a list keeps items in order."),
    ("what is the capital of france?", "paris is the capital."),
]

SMALL = dict(
    encoder_size=512, encoder_active_bits=20, columns=512, sp_density=0.04, cells_per_column=8,
    activation_threshold=8, min_threshold=6, max_new_synapse_count=12, predicted_segment_decrement=0.02,
    classifier_alpha=1.0, context_words=8, context_bits_per_word=8, context_positional=True, sp_learn=False,
    seed=3,
)


def dialogue_model(passes: int = 40, **kw) -> HTMLanguageModel:
    """An HTM trained on the dialogue fixture, rendered with the chat template, one document each."""
    docs = [format_chat([{"role": "user", "content": q}]) + " " + a for q, a in DIALOGUES]
    tok = build_tokenizer("char", docs)
    model = HTMLanguageModel(vocab_size=tok.vocab_size, **{**SMALL, **kw})
    model.set_tokenizer(tok)
    rng = np.random.default_rng(0)
    for _ in range(passes):
        for i in rng.permutation(len(docs)):
            ids = tok.encode(docs[i]) + [tok.eos_id]
            model.learn_text(ids)
    return model


@pytest.fixture(scope="module")
def model():
    return dialogue_model()


def greedy(backend, question: str) -> str:
    return backend.chat([{"role": "user", "content": question}], max_tokens=60, temperature=0).strip()


def test_replies_follow_the_question(model):
    """Every trained question gets a reply of its own that starts as its trained answer, most of
    them the whole answer; a new wording that shares the key word gets that word's answer; without
    the word context (the temporal memory alone) every question gets the same reply."""
    backend = LocalBackend(model, name="htm")
    replies = {q: greedy(backend, q) for q, _ in DIALOGUES}
    assert len(set(replies.values())) == len(DIALOGUES), replies
    for q, a in DIALOGUES:
        assert replies[q][:6] == a[:6], (q, replies[q])
    assert sum(replies[q] == a for q, a in DIALOGUES) >= len(DIALOGUES) // 2, replies
    assert greedy(backend, "please tell me about lists") == DIALOGUES[2][1]
    blind = LocalBackend(dialogue_model(context_words=0), name="htm")
    assert len({greedy(blind, q) for q, _ in DIALOGUES}) == 1


def test_serve_chat_path_gives_the_chat_py_answer(model, tmp_path):
    import httpx

    from memlm.apps.chat import Chat, parse_args
    from memlm.apps.serve import BackgroundServer, ServerState, create_app

    backend = LocalBackend(model, name="htm")
    server = BackgroundServer(create_app(ServerState(backend, "htm")))
    url = server.start()
    try:
        for q, _ in DIALOGUES[:2] + [("what is love?", "")]:
            r = httpx.post(f"{url}/chat/completions", json={"model": "htm", "temperature": 0, "max_tokens": 60,
                                                            "messages": [{"role": "user", "content": q}]}, timeout=60)
            served = r.json()["choices"][0]["message"]["content"]
            args = parse_args(["--base-url", url, "--prompt", q, "--temperature", "0", "--max-new-tokens", "60"])
            out = __import__("io").StringIO()
            chat = Chat(args, backend, out=out)
            assert chat.turn(q) == served and served.strip()
    finally:
        server.stop()


FACT, PREFIX = "the secret word is banana", "the secret word is"
OTHER_TURNS = ["hello, who are you?", "tell me about lists", "what is the capital of france?"]


def chat_session(backend, tmp_path, *flags):
    from memlm.apps.chat import Chat, parse_args

    args = parse_args(["--ckpt", str(tmp_path / "htm.ckpt"), "--temperature", "0", "--max-new-tokens", "12",
                       "--template", "none", *flags])
    return Chat(args, backend, out=__import__("io").StringIO(), err=__import__("io").StringIO())


def five_turns(chat) -> str:
    chat.turn(FACT)
    for text in OTHER_TURNS:
        chat.turn(text)
    return chat.turn(PREFIX)


def test_learning_in_chat_saves_the_state_and_logs_every_exchange(tmp_path):
    import json

    state, log = tmp_path / "htm.learned.pt", tmp_path / "chat.jsonl"
    learner = dialogue_model()
    before = learner.tm.num_synapses
    chat = chat_session(LocalBackend(learner, name="htm", template="none"), tmp_path,
                        "--learn", "--learn-state", str(state), "--save-every", "2", "--log", str(log))
    chat.turn(FACT)
    assert not state.exists() and learner.tm.num_synapses > before  # learned, saved every 2 turns
    chat.turn(OTHER_TURNS[0])
    assert state.exists()
    saved = state.stat().st_mtime_ns
    reply = chat.turn(PREFIX)
    chat.close()  # the third turn is saved at exit
    assert state.stat().st_mtime_ns >= saved
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["user"] for r in rows] == [FACT, OTHER_TURNS[0], PREFIX] and rows[-1]["reply"] == reply.strip()
    assert all(r["learned"] for r in rows)
    # the saved state is the learner's: a new session of the same checkpoint continues from it
    fresh = dialogue_model()
    fresh.load_learned_state(str(state))
    assert fresh.tm.num_synapses == learner.tm.num_synapses
    np.testing.assert_array_equal(fresh.classifier.weights, learner.classifier.weights)


def test_a_fact_taught_in_turn_one_is_completed_in_turn_five(tmp_path):
    """chat.py --learn, default rehearsals: the whole conversation is the prompt, and turn 4
    re-teaches "is t" on the cells the fact's "is " shares. The positional word context
    (slot 2 holds "word", not "paris") is what carries the fact: as a bag of words it fails."""
    chat = chat_session(LocalBackend(dialogue_model(), name="htm", template="none"), tmp_path,
                        "--learn", "--learn-state", str(tmp_path / "s.pt"))
    assert five_turns(chat).strip().startswith("banana")
    bag = chat_session(LocalBackend(dialogue_model(context_positional=False), name="htm", template="none"),
                       tmp_path, "--learn", "--learn-state", str(tmp_path / "bag.pt"))
    assert not five_turns(bag).strip().startswith("banana")


def test_learned_state_is_written_atomically(tmp_path, model, monkeypatch):
    path = tmp_path / "s.pt"
    model.save_learned_state(str(path))
    good = path.read_bytes()

    def killed(*a, **k):  # the process dies in the middle of writing the new state
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        model.save_learned_state(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["s.pt"]
    model.load_learned_state(str(path))


def test_learning_errors_are_one_line(tmp_path, model):
    backend = LocalBackend(model, name="htm", template="none")
    other = dialogue_model(passes=1, cells_per_column=4)
    other.save_learned_state(str(tmp_path / "other.pt"))
    with pytest.raises(MemLMError, match="another configuration"):
        chat_session(backend, tmp_path, "--learn", "--learn-state", str(tmp_path / "other.pt"))
    chat = chat_session(backend, tmp_path)
    assert chat.turn("") == "" and chat.turn("   ") == ""


def test_read_only_state_path_is_refused(tmp_path, model, monkeypatch):
    import os

    backend = LocalBackend(model, name="htm", template="none")
    real_access = os.access
    # the tests may run as root, which writes through file modes: the folder reports read-only instead
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) and mode == os.W_OK
                        else real_access(p, mode))
    with pytest.raises(MemLMError, match="read-only") as err:
        chat_session(backend, tmp_path, "--learn", "--learn-state", str(tmp_path / "s.pt"))
    assert "\n" not in str(err.value)


def test_embed_measures_text_overlap(model):
    tok = model.tokenizer
    vec = {t: model.embed(tok.encode(t)) for t in ("tell me about lists", "tell me about list items", "paris is the capital")}
    cos = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm()))  # noqa: E731
    assert cos(vec["tell me about lists"], vec["tell me about list items"]) > cos(vec["tell me about lists"],
                                                                                  vec["paris is the capital"]) + 0.1
    before = model.htm_state()
    model.embed(tok.encode("hello"))
    for k in ("tm", "classifier"):
        for name, t in before[k].items():
            assert torch.equal(t, model.htm_state()[k][name]), name
    with pytest.raises(MemLMError):
        model.embed([])


def test_serve_learn_learns_saves_and_logs_through_the_real_server(tmp_path):
    """serve.py --learn --log: each chat completion is learned (the synapses grow), the state is
    saved every --save-every exchanges and at shutdown, and every exchange is one JSON line."""
    import json

    import httpx

    from memlm.apps.serve import BackgroundServer, ServerState, attach_learning, create_app, parse_args

    learner = dialogue_model(passes=5)
    state_path, log = tmp_path / "htm.learned.pt", tmp_path / "serve.jsonl"
    args = parse_args(["--ckpt", str(tmp_path / "htm.ckpt"), "--learn", "--learn-state", str(state_path),
                       "--save-every", "2", "--log", str(log)])
    state = ServerState(LocalBackend(learner, name="htm"), "htm")
    attach_learning(state, args)
    server = BackgroundServer(create_app(state))
    url = server.start()
    steps = [learner.tm.iteration]  # learned temporal-memory steps (the synapse count may fall: pruning)
    try:
        for i, q in enumerate([FACT, OTHER_TURNS[0], OTHER_TURNS[1]]):
            r = httpx.post(f"{url}/chat/completions", json={"temperature": 0, "max_tokens": 8,
                                                            "messages": [{"role": "user", "content": q}]}, timeout=60)
            assert r.status_code == 200, r.text
            steps.append(learner.tm.iteration)
            assert state_path.exists() == (i >= 1)  # saved after the 2nd exchange, not the 1st
    finally:
        server.stop()
        state.close()
    # each exchange learned its user turn, 10 rehearsals (the default) of every token but the last
    assert np.diff(steps).tolist() == [10 * len(state.backend.encode(q)) for q in [FACT, OTHER_TURNS[0], OTHER_TURNS[1]]]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["user"] for r in rows] == [FACT, OTHER_TURNS[0], OTHER_TURNS[1]] and all(r["learned"] for r in rows)
    fresh = dialogue_model(passes=5)
    fresh.load_learned_state(str(state_path))  # the 3rd exchange was saved at shutdown
    assert fresh.tm.num_synapses == learner.tm.num_synapses
