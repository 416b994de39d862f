"""The one OpenAI-compatible HTTP client in MemLM (chat, LTML extraction and embeddings, the
Hebbian teacher all use it).

It speaks to Ollama, LM Studio, vLLM or this project's serve.py through the official
``openai`` package, and turns every failure into one :class:`MemLMError` line that says what
to do. Any of ``http://host:port``, ``http://host:port/v1`` or the full
``.../v1/chat/completions`` address is accepted.
"""
from __future__ import annotations

import os
import time
from typing import Iterator
from urllib.parse import urlparse

import numpy as np

from memlm.core.errors import MemLMError

API_KEY_ENV = "OPENAI_API_KEY"


def normalise_base_url(url: str) -> str:
    """The ``.../v1`` base of an OpenAI-compatible server, from any of the address forms above."""
    url = (url or "").strip().rstrip("/")
    if not urlparse(url).scheme:
        url = "http://" + url
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise MemLMError(f"{url!r} is not an http(s) address; use e.g. http://localhost:11434/v1")
    for suffix in ("/chat/completions", "/completions", "/embeddings", "/models"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
            break
    if urlparse(url).path in ("", "/"):
        url += "/v1"
    return url


class OpenAIClient:
    """A thin, error-translating wrapper over ``openai.OpenAI`` for one server."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 0) -> None:
        import openai

        self._openai = openai
        self.base_url = normalise_base_url(base_url)
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or "not-needed"
        self.retries = max(0, int(retries))
        self.timeout = float(timeout)
        self.client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0)
        self._model = model

    # -- errors -------------------------------------------------------------------------
    def error(self, exc: Exception) -> MemLMError:
        """One line for a failed request: what happened, and what to do about it."""
        o = self._openai
        if isinstance(exc, o.APITimeoutError):
            return MemLMError(f"the server at {self.base_url} gave no answer within {self.timeout:g} s")
        if isinstance(exc, o.APIConnectionError):
            return MemLMError(
                f"cannot reach an OpenAI-compatible server at {self.base_url}; start it (e.g. python serve.py --ckpt CKPT) "
                "or fix the URL"
            )
        if isinstance(exc, o.AuthenticationError):
            return MemLMError(f"the server at {self.base_url} rejected the API key; pass the right --api-key")
        if isinstance(exc, o.NotFoundError):
            return MemLMError(f"the server at {self.base_url} has no model {self._model!r}; "
                              "pick one from its /v1/models with --model")
        if isinstance(exc, o.APIStatusError):
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return MemLMError(f"the server at {self.base_url} answered {exc.status_code}: {msg}")
        return MemLMError(f"request to {self.base_url} failed: {exc}")

    def _retryable(self, exc: Exception) -> bool:
        o = self._openai
        if isinstance(exc, (o.APITimeoutError, o.APIConnectionError)):
            return True
        return isinstance(exc, o.APIStatusError) and (exc.status_code >= 500 or exc.status_code == 429)

    def _call(self, fn, *args, **kw):
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0, 0.2 * 2 ** (attempt - 1)))
            try:
                return fn(*args, **kw)
            except self._openai.OpenAIError as exc:
                last = exc
                if not self._retryable(exc):
                    break
        raise self.error(last) from last

    # -- models -------------------------------------------------------------------------
    def models(self) -> list[str]:
        return [m.id for m in self._call(lambda: list(self.client.models.list()))]

    @property
    def model(self) -> str:
        """The model named at construction, else the server's first listed model."""
        if self._model is None:
            names = self.models()
            if not names:
                raise MemLMError(f"the server at {self.base_url} lists no models; pass --model NAME")
            self._model = names[0]
        return self._model

    # -- requests -----------------------------------------------------------------------
    def _chat_kwargs(self, messages, max_tokens, temperature, top_k, top_p, seed, stop, extra) -> dict:
        kw: dict = {"model": self.model, "messages": list(messages), "max_tokens": int(max_tokens),
                    "temperature": float(temperature)}
        if top_p is not None:
            kw["top_p"] = float(top_p)
        if seed is not None:
            kw["seed"] = int(seed)
        if stop:
            kw["stop"] = list(stop)
        body = dict(extra or {})
        if top_k is not None:
            body["top_k"] = int(top_k)
        if body:
            kw["extra_body"] = body
        return kw

    def stream_chat(self, messages, max_tokens=128, temperature=0.8, top_k=None, top_p=None, seed=None, stop=None,
                    info=None, extra_body=None) -> Iterator[str]:
        """Yield the reply's text pieces; ``info["finish_reason"]`` is set at the end."""
        info = info if info is not None else {}
        kw = self._chat_kwargs(messages, max_tokens, temperature, top_k, top_p, seed, stop, extra_body)
        try:
            for chunk in self.client.chat.completions.create(stream=True, **kw):
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.finish_reason:
                    info["finish_reason"] = choice.finish_reason
                piece = choice.delta.content if choice.delta else None
                if piece:
                    yield piece
        except self._openai.OpenAIError as exc:
            raise self.error(exc) from exc

    def complete(self, messages, max_tokens=128, temperature=0.7, top_k=None, top_p=None, seed=None, stop=None,
                 response_format: dict | None = None, extra_body=None) -> str:
        """The whole reply text of one non-streamed chat completion (retried on 5xx/429/timeouts)."""
        kw = self._chat_kwargs(messages, max_tokens, temperature, top_k, top_p, seed, stop, extra_body)
        if response_format is not None:
            kw["response_format"] = response_format
        resp = self._call(self.client.chat.completions.create, **kw)
        try:
            content = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise MemLMError(f"the server at {self.base_url} did not answer with a chat completion") from None
        if content is not None and not isinstance(content, str):
            raise MemLMError(f"the server at {self.base_url} answered without text content")
        return content or ""

    def embed(self, texts: list[str]) -> np.ndarray:
        resp = self._call(self.client.embeddings.create, model=self.model, input=list(texts))
        return np.asarray([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)
