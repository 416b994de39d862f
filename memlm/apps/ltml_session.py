"""LTML in front of any chat backend: log every turn, inject memories, sleep when idle.

:class:`LTMLMemory` is what chat.py and serve.py use:

    mem = LTMLMemory("ltml.sqlite", embedder="auto", backend=backend)
    sid = mem.start_session("local:model.ckpt")
    messages, injection = mem.prepare(messages)      # wake: system prompt + memories
    ...generate reply...
    mem.record(sid, user_text, reply)                  # log both sides
    mem.sleep()                                        # consolidate (on exit / idle)

Sleep on idle runs in a background thread over its own SQLite connection (WAL lets the
chat keep logging while it runs).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from memlm.checkpoint import load_module
from memlm.memory.ltml.embeddings import get_embedder
from memlm.memory.ltml.index import MemoryIndex
from memlm.memory.ltml.sleep import SleepConfig, sleep
from memlm.memory.ltml.store import Store
from memlm.memory.ltml.wake import Injection, WakeConfig, system_prompt, wake


class LTMLMemory:
    def __init__(
        self,
        path: str,
        embedder="auto",
        backend=None,
        count_tokens: Callable[[str], int] | None = None,
        wake_config: WakeConfig | None = None,
        sleep_config: SleepConfig | None = None,
        llm_consolidation: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.path = str(path)
        self.say = log or (lambda msg: None)
        self.store = Store(self.path)
        if isinstance(embedder, str):
            base_url = getattr(backend, "base_url", None)
            embedder = get_embedder(embedder, base_url=base_url, api_key=getattr(backend, "api_key", None),
                                    module=getattr(backend, "module", None), log=self.say,
                                    load_checkpoint=load_module)
        self.embedder = embedder
        self.backend = backend
        self.count_tokens = count_tokens
        self.wake_config = wake_config or WakeConfig()
        self.sleep_config = sleep_config or SleepConfig(use_llm=llm_consolidation)
        self.index = MemoryIndex(self.store, embedder.name)
        self._sleep_lock = threading.Lock()
        self._idle_timer: threading.Timer | None = None
        self.last_injection: Injection | None = None

    # -- sessions ---------------------------------------------------------------------
    def start_session(self, backend_name: str = "") -> int:
        return self.store.start_session(backend_name)

    def end_session(self, session_id: int) -> None:
        self.store.end_session(session_id)

    def session_start_injection(self) -> Injection:
        """What would be injected with no query (importance and recency only); not counted as use."""
        if self.store.get_meta("embedder") not in (None, self.embedder.name):
            return Injection("")
        return wake(self.store, self.embedder, None, self.wake_config, self.count_tokens, touch=False, index=self.index)

    # -- turns ------------------------------------------------------------------------
    def prepare(self, messages: list[dict]) -> tuple[list[dict], Injection]:
        """Return ``messages`` with the memory block added to the system prompt."""
        query = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
        if self.store.get_meta("embedder") not in (None, self.embedder.name):
            from memlm.memory.ltml.sleep import ensure_embedder

            ensure_embedder(self.store, self.embedder)
        injection = wake(self.store, self.embedder, query if isinstance(query, str) else None, self.wake_config,
                         self.count_tokens, index=self.index)
        self.last_injection = injection
        if not injection.text:
            return list(messages), injection
        out = [dict(m) for m in messages]
        if out and out[0].get("role") == "system":
            out[0]["content"] = system_prompt(out[0].get("content") or "", injection)
        else:
            out.insert(0, {"role": "system", "content": injection.text})
        return out, injection

    def record(self, session_id: int | None, user_text: str, reply: str | None) -> None:
        self.store.log(session_id, "user", user_text)
        if reply:
            self.store.log(session_id, "assistant", reply)

    # -- sleep ------------------------------------------------------------------------
    def sleep(self, now: float | None = None) -> dict | None:
        """Consolidate now (skipped when a sleep is already running)."""
        if not self._sleep_lock.acquire(blocking=False):
            return None
        try:
            store = Store(self.path)  # own connection: safe from a background thread
            try:
                backend = self.backend if self.sleep_config.use_llm and getattr(self.backend, "can_extract", False) else None
                stats = sleep(store, self.embedder, backend=backend, now=now, config=self.sleep_config, log=self.say)
            finally:
                store.close()
            self.index.generation = -1  # reload the rebuilt index on next use
            return stats
        finally:
            self._sleep_lock.release()

    def touch_idle(self, idle_seconds: float | None) -> None:
        """(Re)start the idle timer: sleep after ``idle_seconds`` without a turn."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if idle_seconds and idle_seconds > 0:
            self._idle_timer = threading.Timer(idle_seconds, self.sleep)
            self._idle_timer.daemon = True
            self._idle_timer.start()

    def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        with self._sleep_lock:
            self.store.close()

    def pending(self) -> int:
        return len(self.store.pending_interactions())

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()
