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
from urllib.parse import urlparse

import numpy as np

from memlm.errors import MemLMError

ROLE_TAGS = {"system": "System", "user": "User", "assistant": "Assistant"}
STOP_STRINGS = ("\nUser:", "\nSystem:", "\nAssistant:")


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
        from memory.ltml.wake import estimate_tokens

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
        """Continue ``prompt`` (text or token ids), yielding text pieces as they are generated."""
        import torch

        info = info if info is not None else {}
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            ids = [self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0]
        info.update(prompt_tokens=len(ids), completion_tokens=0, finish_reason="length")
        stops = [s for s in (stop or []) if s]
        eos = self.tokenizer.eos_id
        with self.lock:
            gen = None
            if seed is not None:
                gen = torch.Generator(device=getattr(self.module, "device", "cpu")).manual_seed(int(seed))
            out: list[int] = []
            emitted = ""
            for tok in self.module.generate(ids, max_new_tokens=int(max_tokens), temperature=float(temperature),
                                            top_k=top_k, top_p=top_p, eos_id=eos, generator=gen):
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


def normalise_base_url(url: str) -> str:
    """Accept ``http://host:port`` as well as ``http://host:port/v1``."""
    url = url.rstrip("/")
    if not urlparse(url).scheme:
        url = "http://" + url
    if urlparse(url).path in ("", "/"):
        url += "/v1"
    return url


class OpenAIBackend(ChatBackend):
    """Any OpenAI-compatible server (Ollama, LM Studio, vLLM, serve.py) through the ``openai`` client."""

    can_extract = True

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0) -> None:
        import openai

        self._openai = openai
        self.base_url = normalise_base_url(base_url)
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
        self.client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=timeout, max_retries=0)
        self.model = model or self._first_model()
        self.name = f"{self.base_url}#{self.model}"

    def _errors(self, exc: Exception) -> MemLMError:
        o = self._openai
        if isinstance(exc, o.APIConnectionError):
            return MemLMError(
                f"cannot reach an OpenAI-compatible server at {self.base_url}; start it (e.g. python serve.py --ckpt CKPT) "
                "or fix --base-url"
            )
        if isinstance(exc, o.AuthenticationError):
            return MemLMError(f"the server at {self.base_url} rejected the API key; pass the right --api-key")
        if isinstance(exc, o.NotFoundError):
            return MemLMError(f"the server at {self.base_url} has no model {getattr(self, 'model', None)!r}; "
                              "pick one from its /v1/models with --model")
        if isinstance(exc, o.APIStatusError):
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return MemLMError(f"the server at {self.base_url} answered {exc.status_code}: {msg}")
        return MemLMError(f"request to {self.base_url} failed: {exc}")

    def _first_model(self) -> str:
        try:
            models = list(self.client.models.list())
        except self._openai.OpenAIError as exc:
            raise self._errors(exc) from exc
        if not models:
            raise MemLMError(f"the server at {self.base_url} lists no models; pass --model NAME")
        return models[0].id

    def stream_chat(self, messages, max_tokens=128, temperature=0.8, top_k=None, top_p=None, seed=None, stop=None,
                    info=None) -> Iterator[str]:
        info = info if info is not None else {}
        kw: dict = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                    "temperature": float(temperature), "stream": True}
        if top_p is not None:
            kw["top_p"] = float(top_p)
        if seed is not None:
            kw["seed"] = int(seed)
        if stop:
            kw["stop"] = list(stop)
        if top_k is not None:
            kw["extra_body"] = {"top_k": int(top_k)}
        try:
            stream = self.client.chat.completions.create(**kw)
            for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.finish_reason:
                    info["finish_reason"] = choice.finish_reason
                piece = choice.delta.content if choice.delta else None
                if piece:
                    yield piece
        except self._openai.OpenAIError as exc:
            raise self._errors(exc) from exc

    def embed(self, texts: list[str]) -> np.ndarray:
        try:
            resp = self.client.embeddings.create(model=self.model, input=list(texts))
        except self._openai.OpenAIError as exc:
            raise self._errors(exc) from exc
        return np.asarray([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)
