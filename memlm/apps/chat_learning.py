"""Learning while chatting (``--learn``) and the chat log (``--log PATH``), shared by chat.py and serve.py.

:class:`OnlineLearner` hands each exchange to a module that learns online (one with
``learn_text(ids, passes)``, ``save_learned_state(path)`` and ``load_learned_state(path)``,
e.g. the HTM language model): the user's turn, and the reply with ``learn_replies``. The
learned state lives in a state file beside the checkpoint (``<ckpt>.learned.pt`` unless
given): loaded at start when it exists, written atomically every ``save_every`` turns and
at exit, so a kill -9 leaves the previous complete file. :class:`ChatLog` appends one JSON
line per exchange and flushes it at once.
"""
from __future__ import annotations

import json
import os
import threading
import time

from memlm.core.errors import MemLMError


def default_state_path(ckpt: str) -> str:
    return ckpt + ".learned.pt"


def check_writable(path: str, what: str, flag: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MemLMError(f"the folder of the {what} {path} does not exist; create it or pass another {flag}")
    if (os.path.exists(path) and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK):
        raise MemLMError(f"cannot write the {what} {path} (read-only); pass a writable {flag}")


class OnlineLearner:
    """Feeds exchanges to the module's online learning and saves its state now and then."""

    def __init__(self, backend, state_path: str, save_every: int = 1, learn_replies: bool = False,
                 passes: int = 10, log=None) -> None:
        module = getattr(backend, "module", None)
        if module is None or not all(hasattr(module, m) for m in ("learn_text", "save_learned_state", "load_learned_state")):
            kind = type(module).__name__ if module is not None else type(backend).__name__
            raise MemLMError(f"--learn needs a local model that learns online (HTM); {kind} does not")
        if save_every < 1:
            raise MemLMError(f"--save-every must be >= 1, got {save_every}")
        check_writable(state_path, "learned state", "--learn-state")
        self.backend, self.module, self.path = backend, module, state_path
        self.save_every, self.learn_replies, self.passes = int(save_every), bool(learn_replies), int(passes)
        self.turns = 0
        self.unsaved = 0
        self.log = log or (lambda m: None)
        if os.path.exists(state_path):
            with backend.lock:
                module.load_learned_state(state_path)
            self.log(f"[learn] loaded the learned state {state_path}")

    def after_turn(self, user_text: str, reply: str) -> None:
        text = user_text.strip()
        if self.learn_replies and reply.strip():
            text = f"{text}\n{reply.strip()}"
        if not text:
            return
        ids = self.backend.encode(text)
        eos = self.backend.tokenizer.eos_id
        with self.backend.lock:
            self.module.learn_text(ids + ([eos] if eos is not None else []), passes=self.passes)
        self.turns += 1
        self.unsaved += 1
        if self.unsaved >= self.save_every:
            self.save()

    def save(self) -> None:
        with self.backend.lock:
            self.module.save_learned_state(self.path)
        self.unsaved = 0

    def close(self) -> None:
        if self.unsaved:
            self.save()
            self.log(f"[learn] saved the learned state to {self.path} ({self.turns} turns learned)")


class ChatLog:
    """One JSON object per exchange: time, model, user, reply (plus anything passed as extra)."""

    def __init__(self, path: str) -> None:
        check_writable(path, "chat log", "--log")
        self.fh = open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, model: str, user: str, reply: str, **extra) -> None:
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model, "user": user, "reply": reply, **extra}
        with self.lock:
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.fh.flush()

    def close(self) -> None:
        self.fh.close()
