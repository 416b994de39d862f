"""The learner's teacher: any OpenAI-compatible chat-completions server.

Works with LM Studio (default ``http://localhost:1234/v1``), Ollama (``http://localhost:11434/v1``),
or a MemLM model served by this project's ``serve.py``. Requests go through the project's one
client, :class:`memlm.core.openai_client.OpenAIClient`, so the URL may be the full
``.../v1/chat/completions`` address, the ``.../v1`` base, or a bare ``http://host:port``.

Failures (connection refused, timeout, HTTP error, malformed answer) raise
:class:`TeacherUnavailable`, a :class:`memlm.core.errors.MemLMError` with one clear line; the
learner catches it and keeps learning from the user alone.
"""
from __future__ import annotations

from memlm.core.errors import MemLMError
from memlm.core.openai_client import OpenAIClient, OpenAIRequestError

DEFAULT_TEACHER_URL = "http://localhost:1234/v1"
DEFAULT_SYSTEM_PROMPT = "You are a patient teacher talking to a small learner. Answer in one or two short, simple sentences."
#: LM Studio and Ollama's OpenAI endpoints accept any name here; naming one skips a /v1/models round trip.
DEFAULT_TEACHER_MODEL = "local-model"


class TeacherUnavailable(MemLMError):
    """The teacher could not be reached or gave no usable answer."""


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
        self.client = OpenAIClient(url, model=model or DEFAULT_TEACHER_MODEL, api_key=api_key, timeout=timeout,
                                   retries=retries)
        self.url = self.client.base_url
        self.model = self.client.model
        self.timeout = self.client.timeout
        self.retries = self.client.retries
        self.system_prompt = system_prompt
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
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
        self.calls += 1
        try:
            reply = self.client.complete(messages, max_tokens=self.max_tokens, temperature=self.temperature)
        except OpenAIRequestError as exc:
            self.failures += 1
            raise self._down(exc.reason) from exc
        except MemLMError as exc:
            self.failures += 1
            raise self._down(str(exc)) from exc
        return reply.strip()
