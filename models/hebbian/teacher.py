"""A client for any OpenAI-compatible chat-completions endpoint, used as the learner's teacher.

Works with LM Studio (default ``http://localhost:1234/v1/chat/completions``), Ollama
(``http://localhost:11434/v1``), or a MemLM model served by this project's ``serve.py``.
The URL may be the full ``.../chat/completions`` address, the ``.../v1`` base, or a bare
``http://host:port``.

Failures (connection refused, timeout, HTTP error, malformed answer) raise
:class:`TeacherUnavailable`, a :class:`memlm.core.errors.MemLMError` with one clear line; the
learner catches it and keeps learning from the user alone.
"""
from __future__ import annotations

import time
from urllib.parse import urlparse

import httpx

from memlm.core.errors import MemLMError

DEFAULT_TEACHER_URL = "http://localhost:1234/v1/chat/completions"
DEFAULT_SYSTEM_PROMPT = "You are a patient teacher talking to a small learner. Answer in one or two short, simple sentences."


class TeacherUnavailable(MemLMError):
    """The teacher could not be reached or gave no usable answer."""


def chat_completions_url(url: str) -> str:
    """Normalise a server address to its ``/v1/chat/completions`` endpoint."""
    url = url.strip().rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise MemLMError(f"teacher URL {url!r} is not an http(s) address; use e.g. {DEFAULT_TEACHER_URL}")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    if parsed.path in ("", "/"):
        return url + "/v1/chat/completions"
    return url + "/chat/completions"


class TeacherClient:
    def __init__(
        self,
        url: str = DEFAULT_TEACHER_URL,
        model: str | None = None,
        timeout: float = 20.0,
        retries: int = 1,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_tokens: int = 96,
        temperature: float = 0.7,
        api_key: str | None = None,
    ) -> None:
        self.url = chat_completions_url(url)
        self.model = model or "local-model"
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.system_prompt = system_prompt
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.calls = 0
        self.failures = 0

    def _down(self, why: str) -> TeacherUnavailable:
        return TeacherUnavailable(
            f"teacher at {self.url} is unavailable ({why}); start LM Studio, Ollama or `python serve.py` there, "
            "or run without a teacher - the learner keeps learning from your input alone"
        )

    def ask(self, user_text: str, history: list[dict] | None = None) -> str:
        """Return the teacher's reply to ``user_text`` (``history``: earlier chat messages)."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages += list(history or [])
        messages.append({"role": "user", "content": user_text})
        payload = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": False,
        }
        self.calls += 1
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0, 0.2 * 2 ** (attempt - 1)))
            try:
                resp = httpx.post(self.url, json=payload, headers=self.headers, timeout=self.timeout)
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout:g} s"
                continue
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
                continue
            if resp.status_code >= 500 or resp.status_code == 429:
                last = f"HTTP {resp.status_code}"
                continue
            if resp.status_code >= 400:
                self.failures += 1
                raise self._down(f"HTTP {resp.status_code}: {resp.text[:200].strip()}")
            try:
                content = resp.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                self.failures += 1
                raise self._down("the answer is not an OpenAI chat-completions response")
            if not isinstance(content, str):
                self.failures += 1
                raise self._down("the answer has no text content")
            return content.strip()
        self.failures += 1
        raise self._down(last)
