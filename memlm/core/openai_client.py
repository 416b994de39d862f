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
    url = (url or "").strip()
    # "localhost:11434" parses as scheme "localhost"; an address without "://" is host[:port][/path]
    if url and "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
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


class OpenAIRequestError(MemLMError):
    """A request that failed; ``reason`` is the cause alone (e.g. ``HTTP 500``), without the advice."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _first_line(obj) -> str:
    text = str(obj).strip()
    return text.splitlines()[0].strip() if text else ""


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
    def error(self, exc: Exception) -> OpenAIRequestError:
        """One line for a failed request: what happened, and what to do about it."""
        o = self._openai
        reason = self.reason(exc)
        if isinstance(exc, o.APITimeoutError):
            msg = f"the server at {self.base_url} gave no answer within {self.timeout:g} s; check it is not stuck, or raise the timeout"
        elif isinstance(exc, o.APIConnectionError):
            detail = reason.removeprefix("cannot connect").lstrip(": ")
            msg = (f"cannot reach an OpenAI-compatible server at {self.base_url}" + (f" ({detail})" if detail else "")
                   + "; start it (e.g. python serve.py --ckpt CKPT) or fix the URL")
        elif isinstance(exc, o.AuthenticationError):
            msg = f"the server at {self.base_url} rejected the API key; pass the right --api-key"
        elif isinstance(exc, o.NotFoundError):
            msg = f"the server at {self.base_url} has no model {self._model!r}; pick one from its /v1/models with --model"
        elif isinstance(exc, o.APIStatusError):
            msg = f"the server at {self.base_url} answered {reason}"
        elif isinstance(exc, ValueError):
            msg = f"the server at {self.base_url} did not answer in the OpenAI format; check the URL points at an OpenAI-compatible server"
        else:
            msg = f"request to {self.base_url} failed: {reason}"
        return OpenAIRequestError(msg, reason=reason)

    def reason(self, exc: Exception) -> str:
        """The failure alone, in a few words (callers that give their own advice quote this)."""
        o = self._openai
        if isinstance(exc, o.APITimeoutError):
            return f"no answer within {self.timeout:g} s"
        if isinstance(exc, o.APIConnectionError):
            cause = exc.__cause__ or exc.__context__
            detail = _first_line(cause) if cause is not None else ""
            return f"cannot connect: {detail}" if detail else "cannot connect"
        if isinstance(exc, o.APIStatusError):
            try:
                detail = _first_line(exc.response.text)[:200]
            except Exception:  # a streamed body that cannot be read again
                detail = ""
            return f"HTTP {exc.status_code}: {detail}" if detail else f"HTTP {exc.status_code}"
        if isinstance(exc, ValueError):  # undecodable JSON or a body that does not fit the OpenAI schema
            return "the answer is not an OpenAI API response"
        return _first_line(exc) or type(exc).__name__

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
            except (self._openai.OpenAIError, ValueError) as exc:
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
        except (self._openai.OpenAIError, ValueError) as exc:
            raise self.error(exc) from exc

    def complete(self, messages, max_tokens=128, temperature=0.7, top_k=None, top_p=None, seed=None, stop=None,
                 response_format: dict | None = None, extra_body=None, info: dict | None = None) -> str:
        """The whole reply text of one non-streamed chat completion (retried on 5xx/429/timeouts).

        ``info`` receives ``finish_reason`` and, when the server reports usage, the token counts."""
        kw = self._chat_kwargs(messages, max_tokens, temperature, top_k, top_p, seed, stop, extra_body)
        if response_format is not None:
            kw["response_format"] = response_format
        resp = self._call(self.client.chat.completions.create, **kw)
        try:
            content = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise OpenAIRequestError(f"the server at {self.base_url} did not answer with an OpenAI chat completion; "
                                     "check the URL points at an OpenAI-compatible server",
                                     reason="the answer is not an OpenAI chat-completions response") from None
        if content is not None and not isinstance(content, str):
            raise OpenAIRequestError(f"the server at {self.base_url} answered without text content",
                                     reason="the answer has no text content")
        if info is not None:
            info["finish_reason"] = resp.choices[0].finish_reason
            usage = getattr(resp, "usage", None)
            if usage is not None:
                info.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
        return content or ""

    def embed(self, texts: list[str]) -> np.ndarray:
        resp = self._call(self.client.embeddings.create, model=self.model, input=list(texts))
        return np.asarray([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)
