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

import os

from memlm.core.errors import MemLMError
from memlm.core.openai_client import OpenAIClient, OpenAIRequestError

DEFAULT_TEACHER_URL = "http://localhost:1234/v1"
DEFAULT_SYSTEM_PROMPT = "You are a patient teacher talking to a small learner. Answer in one or two short, simple sentences."
#: the teacher's API key when ``api_key`` is not given (then ``OPENAI_API_KEY``, then none)
TEACHER_API_KEY_ENV = "MEMLM_TEACHER_API_KEY"


class TeacherUnavailable(MemLMError):
    """The teacher could not be reached or gave no usable answer."""


class TeacherEmptyReply(TeacherUnavailable):
    """The teacher answered, but with no text (nothing to learn from)."""


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
        # no model name: the server's first /v1/models entry (serve.py and Ollama answer 404 to an invented name)
        self.client = OpenAIClient(url, model=model or None, api_key=api_key or os.environ.get(TEACHER_API_KEY_ENV),
                                   timeout=timeout, retries=retries)
        self.url = self.client.base_url
        self.timeout = self.client.timeout
        self.retries = self.client.retries
        self.system_prompt = system_prompt
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.calls = 0
        self.failures = 0

    @property
    def model(self) -> str:
        """The model named at construction, else the server's first in /v1/models (one request, then cached)."""
        try:
            return self.client.model
        except OpenAIRequestError as exc:
            raise self._down(exc) from exc
        except MemLMError as exc:  # the server lists no models
            raise TeacherUnavailable(f"teacher: {exc} (--teacher-model)") from exc

    def _down(self, exc: OpenAIRequestError) -> TeacherUnavailable:
        # only an unreachable server needs starting; any other failure keeps the client's own advice
        if exc.reason.startswith("cannot connect"):
            return TeacherUnavailable(
                f"teacher at {self.url} is unavailable ({exc.reason}); start LM Studio, Ollama or `python serve.py` "
                "there, or run without a teacher - the learner keeps learning from your input alone"
            )
        msg = str(exc).replace("--model", "--teacher-model").replace("--api-key", "--teacher-api-key")
        return TeacherUnavailable(f"teacher: {msg}" + ("" if exc.reason in msg else f" ({exc.reason})"))

    def ask(self, user_text: str, history: list[dict] | None = None) -> str:
        """Return the teacher's reply to ``user_text`` (``history``: earlier chat messages).

        Raises :class:`TeacherEmptyReply` when the answer has no text."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages += list(history or [])
        messages.append({"role": "user", "content": user_text})
        self.calls += 1
        try:
            self.model  # noqa: B018 - resolves the name first, so a missing model reads as such
            reply = self.client.complete(messages, max_tokens=self.max_tokens, temperature=self.temperature)
        except OpenAIRequestError as exc:
            self.failures += 1
            raise self._down(exc) from exc
        except TeacherUnavailable:
            self.failures += 1
            raise
        except MemLMError as exc:
            self.failures += 1
            raise TeacherUnavailable(f"teacher: {exc}") from exc
        reply = (reply or "").strip()
        if not reply:
            self.failures += 1
            raise TeacherEmptyReply(f"teacher at {self.url} (model {self.client.model!r}) gave an empty reply; "
                                    "nothing was learned from it this turn")
        return reply
