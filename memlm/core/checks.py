"""Range checks for configuration values, run where the values enter (module and datamodule
``__init__``, the CLI), so a bad size is one ``error:`` line before anything is built or trained.
"""
from __future__ import annotations

import operator

from memlm.core.errors import MemLMError


def require_positive(section: str, **values: int | None) -> None:
    """Raise MemLMError naming the first value that is not an integer >= 1 (None means unset and passes).

    ``section`` is the config group the user typed it under, e.g. ``"model"`` or ``"data"``.
    """
    for name, value in values.items():
        if value is None:
            continue
        try:
            if isinstance(value, bool):
                raise TypeError
            number = operator.index(value)
        except TypeError:
            raise MemLMError(f"{section}.{name} must be a positive integer, got {value!r}") from None
        if number < 1:
            raise MemLMError(f"{section}.{name} must be >= 1, got {number}")


def require_divisible(section: str, width_name: str, width: int, heads_name: str, heads: int,
                      even_head: bool = False) -> None:
    """Raise MemLMError unless ``heads`` splits ``width`` into equal (and, with ``even_head``, even) heads."""
    require_positive(section, **{width_name: width, heads_name: heads})
    head = width // heads
    if width % heads or (even_head and head % 2):
        need = " with an even head size (rotary embeddings)" if even_head else ""
        fits = _nearest_fit(width, heads, even_head)
        hint = f"e.g. {section}.{heads_name}={fits}" if fits else f"use an even {section}.{width_name}"
        raise MemLMError(f"{section}.{width_name} ({width}) must be divisible by {section}.{heads_name} ({heads})"
                         f"{need}; {hint}")


def _nearest_fit(width: int, heads: int, even_head: bool) -> int | None:
    """The head count nearest to ``heads`` that does split ``width`` (None when there is none)."""
    ok = [h for h in range(1, width + 1) if width % h == 0 and (not even_head or (width // h) % 2 == 0)]
    return min(ok, key=lambda h: (abs(h - heads), h)) if ok else None
