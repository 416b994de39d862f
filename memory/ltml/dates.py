"""Resolve relative time words against the date a message was written.

"yesterday", "last Friday", "two weeks ago", "tomorrow", "next month" stay in the memory's
words (that is what the user said) and the absolute date is stored beside them, so a
"when did I ...?" question can be answered months later. Dates are UTC calendar days.
"""
from __future__ import annotations

import datetime as dt
import re

_NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
        "nine": 9, "ten": 10, "couple of": 2, "few": 3}
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30, "year": 365}

_RELATIVE = re.compile(
    r"\b(?P<simple>yesterday|today|tonight|this morning|this evening|tomorrow|the day before yesterday)\b"
    r"|\b(?P<dir>last|next|this|on) (?P<wd>monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b"
    r"|\b(?P<dir2>last|next) (?P<unit>week|weekend|month|year)\b"
    r"|\b(?P<n>a|an|one|two|three|four|five|six|seven|eight|nine|ten|\d+|a couple of|a few) "
    r"(?P<unit2>day|week|month|year)s? (?P<way>ago|from now)\b"
    r"|\bin (?P<n3>a|an|one|two|three|four|five|six|seven|eight|nine|ten|\d+) (?P<unit3>day|week|month|year)s?\b",
    re.I,
)


def _count(word: str) -> int:
    word = word.lower().removeprefix("a ").strip() if word.lower() not in ("a", "an") else word.lower()
    return int(word) if word.isdigit() else _NUM.get(word, 1)


def resolve(text: str, at: float) -> list[tuple[str, dt.date]]:
    """(the words, the absolute date) for every relative time expression in ``text``."""
    base = dt.datetime.fromtimestamp(at, dt.timezone.utc).date()
    out = []
    for m in _RELATIVE.finditer(text):
        g = {k: (v.lower() if v else v) for k, v in m.groupdict().items()}
        if g["simple"]:
            shift = {"yesterday": -1, "the day before yesterday": -2, "tomorrow": 1}.get(g["simple"], 0)
            day = base + dt.timedelta(days=shift)
        elif g["wd"]:
            target = _WEEKDAYS.index(g["wd"])
            delta = target - base.weekday()
            if g["dir"] == "last":
                delta = delta - 7 if delta >= 0 else delta
            elif g["dir"] == "next":
                delta = delta + 7 if delta <= 0 else delta
            elif g["dir"] == "on" and delta < 0:  # "on Friday" in a plan means the coming one
                delta += 7
            day = base + dt.timedelta(days=delta)
        elif g["unit"]:
            days = 2 if g["unit"] == "weekend" else _UNIT_DAYS[g["unit"]]
            day = base + dt.timedelta(days=days if g["dir2"] == "next" else -days)
        elif g["unit2"]:
            days = _count(g["n"]) * _UNIT_DAYS[g["unit2"]]
            day = base + dt.timedelta(days=-days if g["way"] == "ago" else days)
        else:
            day = base + dt.timedelta(days=_count(g["n3"]) * _UNIT_DAYS[g["unit3"]])
        out.append((m.group(0), day))
    return out


def annotate(text: str, at: float) -> tuple[str, str | None]:
    """``text`` with "(= YYYY-MM-DD)" after each relative expression, and the dates joined by commas."""
    found = resolve(text, at)
    if not found:
        return text, None
    out = text
    for words, day in found:
        out = re.sub(rf"\b{re.escape(words)}\b", f"{words} (= {day.isoformat()})", out, count=1)
    return out, ",".join(d.isoformat() for _, d in found)


def iso_day(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).date().isoformat()
