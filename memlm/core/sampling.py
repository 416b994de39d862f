"""Sampling the next token: temperature, top-k and nucleus (top-p) filtering.

:class:`SamplingParams` is the one object every ``generate()`` takes; it checks its ranges
when it is built, so a bad value from a flag or a request body fails where it enters,
with one line that names the field, instead of deep inside a generation loop.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memlm.core.errors import MemLMError

if TYPE_CHECKING:  # torch is imported where it is used, so chat.py --base-url and serve's parsing stay light
    import torch


class InvalidSamplingParam(MemLMError):
    """A sampling value out of range; ``field`` names it (serve.py reports it as the request's ``param``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def message_for(self, name: str) -> str:
        """The message with the field called what the user typed (``--top-p``, a body key)."""
        return str(self).replace(self.field, name, 1)


def _integer(field: str, value, lo: int | None = None, hint: str = "") -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise InvalidSamplingParam(field, f"{field} must be an integer, got {value!r}") from None
    if lo is not None and number < lo:
        raise InvalidSamplingParam(field, f"{field} must be >= {lo}{hint}, got {number}")
    return number


def _real(field: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidSamplingParam(field, f"{field} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidSamplingParam(field, f"{field} must be a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. Defaults match what ``generate()`` always did.

    - ``max_new_tokens`` >= 0: at most this many tokens are yielded (0 yields none).
    - ``temperature`` >= 0: 0 is greedy decoding (argmax); the filters below then do nothing.
    - ``top_k`` >= 0: keep the k most likely tokens; None or 0 turns the filter off.
    - ``top_p`` in (0, 1]: keep the smallest set of tokens whose probability reaches top_p;
      None or 1 turns the filter off.
    - ``eos_id``: stop after yielding this token (None: the tokenizer's end-of-text id).
    - ``seed``: a fresh ``torch.Generator`` seeded with it drives the sampling, so the same
      seed gives the same tokens; an explicit ``generator`` passed to ``generate()`` wins.
    - ``use_cache``: reuse the model's state (KV cache / recurrent memory) between steps;
      the tokens are the same either way, only the cost differs.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        # frozen: normalised values (e.g. numpy ints, int temperatures) are stored through object.__setattr__
        def store(name, value):
            object.__setattr__(self, name, value)

        if self.max_new_tokens is None:
            raise InvalidSamplingParam("max_new_tokens", "max_new_tokens must be an integer >= 0, got None")
        store("max_new_tokens", _integer("max_new_tokens", self.max_new_tokens, 0))
        temperature = _real("temperature", self.temperature)
        if temperature < 0:
            raise InvalidSamplingParam("temperature", f"temperature must be >= 0 (0 = greedy), got {temperature}")
        store("temperature", temperature)
        store("top_k", _integer("top_k", self.top_k, 0, " (0 = off)"))
        if self.top_p is not None:
            top_p = _real("top_p", self.top_p)
            if not 0.0 < top_p <= 1.0:
                raise InvalidSamplingParam("top_p", f"top_p must be in (0, 1] (1 = off), got {top_p}")
            store("top_p", top_p)
        store("eos_id", _integer("eos_id", self.eos_id, 0))
        store("seed", _integer("seed", self.seed))
        store("use_cache", bool(self.use_cache))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed`` on ``device``; None (torch's global RNG) without a seed."""
        if self.seed is None:
            return None
        import torch

        return torch.Generator(device=device).manual_seed(self.seed)


def resolve_params(params: SamplingParams | None) -> SamplingParams:
    """``params`` or the defaults; anything else is a caller bug (e.g. the old ``generate(ids, 30)`` form)."""
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"generate() takes a SamplingParams, got {type(params).__name__}; "
                        "e.g. generate(ids, SamplingParams(max_new_tokens=30))")
    return params


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample token ids from ``logits`` [B, V] with ``params``' temperature, top-k and nucleus filtering."""
    import torch

    if params.greedy:
        return logits.argmax(dim=-1)
    top_k, top_p = params.top_k, params.top_p
    logits = logits.float() / params.temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        drop = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
