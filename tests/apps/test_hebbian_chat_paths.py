"""Every chat path with a train.py Hebbian checkpoint: chat.py --ckpt (interactive and --memory),
serve.py chat completions (plain and --memory), and chat.py --learner hebbian with the checkpoint
as --state or --ckpt (the format is detected and kept)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import lightning as L
import pytest
import torch

from memlm.apps import chat
from memlm.checkpoint import load_module
from memlm.datamodules.conversation import ConversationDataModule
from memlm.lightning_modules.hebbian.module import HebbianLanguageModel

REPLY = "hi there!"


def _train_checkpoint(path: Path) -> Path:
    rows = []
    for _ in range(10):
        rows.append({"user": "hello", "assistant": REPLY})
        rows.append({"user": "what does the cat eat?", "assistant": "the cat eats fish."})
    data = path.parent / "dialogues.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    module = HebbianLanguageModel(neurons_per_column=8, synapses_per_neuron=16, temperature=0.3)
    dm = ConversationDataModule(source=str(data), batch_size=4, val_fraction=0.1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(path.parent))
    trainer.fit(module, dm)
    trainer.save_checkpoint(str(path))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _train_checkpoint(tmp_path_factory.mktemp("hebbian") / "last.ckpt")


def test_local_backend_uses_the_learners_own_turns(ckpt):
    from memlm.apps.chat_backends import LocalBackend

    backend = LocalBackend(load_module(ckpt), name="h")
    assert backend.template == "turns"  # no User:/Assistant: tags, which dialogue data never contains
    assert backend.chat([{"role": "user", "content": "hello"}], max_tokens=16, temperature=0.0) == REPLY
    # an earlier exchange and a system prompt do not derail the reply
    history = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "what does the cat eat?"},
               {"role": "assistant", "content": "the cat eats fish."}, {"role": "user", "content": "hello"}]
    assert backend.chat(history, max_tokens=16, temperature=0.0) == REPLY


def test_interactive_chat_ckpt_replies(ckpt, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nquit\n"))
    assert chat.main(["--ckpt", str(ckpt), "--temperature", "0"]) == 0
    assert REPLY in capsys.readouterr().out


def test_interactive_chat_with_memory_replies(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert chat.main(["--ckpt", str(ckpt), "--temperature", "0", "--memory", str(tmp_path / "m.sqlite"),
                      "--embedder", "hash", "--no-sleep-on-exit"]) == 0
    assert REPLY in capsys.readouterr().out


@pytest.mark.parametrize("with_memory", [False, True])
def test_serve_chat_completions_reply(ckpt, tmp_path, with_memory):
    from memlm.apps.chat_backends import LocalBackend
    from memlm.apps.ltml_session import LTMLMemory
    from memlm.apps.serve import BackgroundServer, ServerState, create_app
    from memlm.memory.ltml.embeddings import HashEmbedder

    backend = LocalBackend(load_module(ckpt), name="h")
    memory = LTMLMemory(str(tmp_path / "mem.sqlite"), embedder=HashEmbedder(), backend=backend,
                        count_tokens=backend.count_tokens) if with_memory else None
    srv = BackgroundServer(create_app(ServerState(backend, "h", max_tokens_cap=32, max_prompt_tokens=2000,
                                                  memory=memory)))
    url = srv.start()
    try:
        r = httpx.post(f"{url}/chat/completions", json={
            "model": "h", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "temperature": 0},
            timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == REPLY
    finally:
        srv.stop()
        if memory is not None:
            memory.close()


@pytest.mark.parametrize("flag", ["--state", "--ckpt"])
def test_learner_continues_a_train_py_checkpoint(ckpt, tmp_path, flag, capsys):
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(ckpt.read_bytes())
    before = torch.load(copy, weights_only=True)["hebbian_state"]["counters"][2].item()
    assert chat.main(["--learner", "hebbian", flag, str(copy), "--prompt", "hello"]) == 0
    assert f"hebbian> {REPLY}" in capsys.readouterr().out
    # saved back in its own format: still a checkpoint load_module reads, one utterance further on
    module = load_module(copy)
    assert module.learner.utterances == before + 1


def test_learner_refuses_another_architectures_checkpoint(tmp_path):
    from memlm.core.errors import MemLMError

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "memlm": {}}, other)
    with pytest.raises(MemLMError, match="another architecture"):
        chat.main(["--learner", "hebbian", "--state", str(other), "--prompt", "hi"])
