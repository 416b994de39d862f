"""Chat backends: one interface over a local MemLM module or any OpenAI-compatible server.

- :class:`LocalBackend` wraps a loaded MemLM module (any architecture: it only uses the
  chat protocol ``generate``/``embed`` and the checkpoint's tokenizer). Conversations are
  rendered with a plain-text template (:func:`format_chat`) and generation stops at the
  next speaker tag. Text is streamed by decoding the growing id list and yielding the new
  suffix (holding back an incomplete UTF-8 character or a partial stop string).
- :class:`OpenAIBackend` talks to Ollama, LM Studio, vLLM or this project's serve.py via
  the official ``openai`` client, streaming.

Both expose ``stream_chat(messages, ...) -> Iterator[str]``, ``chat(...) -> str``,
``count_tokens(text)`` and ``embed(texts)``; ``info`` dicts passed to the stream calls
receive ``finish_reason``, ``prompt_tokens`` and ``completion_tokens``.
"""
from __future__ import annotations

import os
import threading
from typing import Iterator

import numpy as np

from memlm.core.errors import MemLMError
from memlm.core.openai_client import OpenAIClient, normalise_base_url  # noqa: F401 (re-exported)
from memlm.core.sampling import SamplingParams

ROLE_TAGS = {"system": "System", "user": "User", "assistant": "Assistant"}
STOP_STRINGS = ("\nUser:", "\nSystem:", "\nAssistant:")
TURN_SEPARATOR = "\x1e"  # the "turns" template's separator (memlm.datamodules.conversation's dialogue format)


def format_chat(messages: list[dict]) -> str:
    """Plain-text chat template: ``System: ...`` / ``User: ...`` / ``Assistant: ...`` lines, ending with ``Assistant:``."""
    parts = []
    for m in messages:
        role = m.get("role", "user")
        content = m.get("content") or ""
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{ROLE_TAGS.get(role, role.capitalize())}: {content.strip()}")
    parts.append("Assistant:")
    return "\n".join(parts)


def format_turns(messages: list[dict]) -> str:
    """The "turns" template of learners trained on raw dialogues (no role tags): the user and
    assistant texts joined by ``TURN_SEPARATOR``; system messages (and memories injected there)
    are left out, since such a learner never saw them."""
    texts = []
    for m in messages:
        if m.get("role", "user") == "system":
            continue
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        texts.append(content.strip())
    return TURN_SEPARATOR.join(texts)


class ChatBackend:
    name: str = "backend"
    #: whether the backend can follow an instruction to extract memories as JSON
    can_extract: bool = False

    def stream_chat(self, messages: list[dict], max_tokens: int = 128, temperature: float = 0.8, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                    info: dict | None = None) -> Iterator[str]:
        raise MemLMError(f"{type(self).__name__} cannot chat")

    def chat(self, messages: list[dict], **kw) -> str:
        return "".join(self.stream_chat(messages, **kw))

    def count_tokens(self, text: str) -> int:
        from memlm.memory.ltml.wake import estimate_tokens

        return estimate_tokens(text)

    def embed(self, texts: list[str]) -> np.ndarray:
        raise MemLMError(f"{type(self).__name__} has no embeddings")


class LocalBackend(ChatBackend):
    """A loaded MemLM module. Model access is serialised by a lock (safe for a threaded server)."""

    def __init__(self, module, name: str = "memlm", template: str = "chat") -> None:
        if getattr(module, "tokenizer", None) is None:
            raise MemLMError("the checkpoint has no tokenizer; re-save it with train.py (MemLM stores it in the checkpoint)")
        self.module = module
        self.tokenizer = module.tokenizer
        self.name = name
        if template == "chat":  # a module may name its own chat template (the Hebbian learner: "turns")
            template = getattr(module, "chat_template", None) or "chat"
        self.template = template
        self.lock = threading.Lock()

    @property
    def context_limit(self) -> int | None:
        return getattr(self.module, "max_seq_len", None)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render(self, messages: list[dict], max_new_tokens: int) -> str:
        """The chat template, dropping the oldest turns (never the system prompt or last turn) to fit the context."""
        if self.template == "none":
            return "\n".join(str(m.get("content") or "") for m in messages)
        if self.template == "turns":
            return format_turns(messages)
        limit = self.context_limit
        msgs = list(messages)
        text = format_chat(msgs)
        if limit is None:
            return text
        while len(self.encode(text)) + max_new_tokens > limit:
            droppable = [i for i, m in enumerate(msgs[:-1]) if m.get("role") != "system"]
            if not droppable:
                break
            msgs.pop(droppable[0])
            text = format_chat(msgs)
        return text

    def stream_chat(self, messages, max_tokens=128, temperature=0.8, top_k=None, top_p=None, seed=None, stop=None,
                    info=None) -> Iterator[str]:
        prompt = self.render(messages, max_tokens)
        stops = list(stop or []) + (list(STOP_STRINGS) if self.template == "chat" else [])
        return self.stream_prompt(prompt, max_tokens, temperature, top_k, top_p, seed, stops, info)

    def stream_prompt(self, prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.8,
                      top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                      stop: list[str] | None = None, info: dict | None = None) -> Iterator[str]:
        """Continue ``prompt`` (text or token ids), yielding text pieces as they are generated.

        The sampling values are checked here, before the first piece (MemLMError when out of range)."""
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                eos_id=self.tokenizer.eos_id, seed=seed)
        return self._stream(prompt, params, stop, info if info is not None else {})

    def _stream(self, prompt: str | list[int], params: SamplingParams, stop: list[str] | None, info: dict) -> Iterator[str]:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            ids = [self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0]
        info.update(prompt_tokens=len(ids), completion_tokens=0, finish_reason="length")
        stops = [s for s in (stop or []) if s]
        eos = params.eos_id
        with self.lock:
            out: list[int] = []
            emitted = ""
            for tok in self.module.generate(ids, params):
                if eos is not None and tok == eos:
                    info["finish_reason"] = "stop"
                    break
                out.append(int(tok))
                info["completion_tokens"] = len(out)
                text = self.tokenizer.decode(out)
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    final = text[:cut]
                    if final.startswith(emitted) and len(final) > len(emitted):
                        yield final[len(emitted):]
                    info["finish_reason"] = "stop"
                    return
                safe = text.rstrip("\ufffd")
                hold = max((k for s in stops for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
                safe = safe[: len(safe) - hold]
                if safe.startswith(emitted) and len(safe) > len(emitted):
                    yield safe[len(emitted):]
                    emitted = safe
            if out:
                text = self.tokenizer.decode(out)
                if text.startswith(emitted) and len(text) > len(emitted):
                    yield text[len(emitted):]

    def embed(self, texts: list[str] | list[list[int]]) -> np.ndarray:
        import torch

        rows = []
        with self.lock, torch.no_grad():
            for t in texts:
                ids = self.encode(t) if isinstance(t, str) else list(t)
                if not ids:
                    ids = [self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0]
                rows.append(self.module.embed(ids).float().cpu().numpy())
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


class OpenAIBackend(ChatBackend):
    """Any OpenAI-compatible server (Ollama, LM Studio, vLLM, serve.py), through :class:`OpenAIClient`."""

    can_extract = True

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 1) -> None:
        # retries apply to whole (non-streamed) requests only: a half-streamed reply is never re-sent
        self.client = OpenAIClient(base_url, model=model, api_key=api_key, timeout=timeout, retries=retries)
        self.base_url = self.client.base_url
        self.api_key = self.client.api_key
        self.model = self.client.model  # resolves the server's first model now, so a dead server fails here
        self.name = f"{self.base_url}#{self.model}"

    def stream_chat(self, messages, max_tokens=128, temperature=0.8, top_k=None, top_p=None, seed=None, stop=None,
                    info=None) -> Iterator[str]:
        return self.client.stream_chat(messages, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, stop=stop, info=info)

    def chat(self, messages, max_tokens=128, temperature=0.8, top_k=None, top_p=None, seed=None, stop=None,
             info=None) -> str:
        """One non-streamed, retried completion: what LTML extraction needs (the whole JSON reply, or an error)."""
        return self.client.complete(messages, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, stop=stop, info=info)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.client.embed(texts)
