"""Seeded synthetic facts for fact-recall training and evaluation.

``make_facts(n, seed, split)`` returns ``n`` :class:`Fact` s such as::

    text      "The capital of Zorbia is Quelt."
    question  "What is the capital of Zorbia?"
    value     "Quelt"                                  (the answer; exact match is the metric)
    cloze     "The capital of Zorbia is"               (the answer prefix; prompt("cloze") asks
                                                        the question, then this)

Names are invented from syllables, so no pretrained knowledge can answer them. Every name
belongs to exactly one split, decided by a hash of the name itself (not by the seed), so the
subjects and name values of ``split="train"`` and ``split="eval"`` never overlap whatever the
seeds; colour and number values come from disjoint per-split lists too. Within one call every
subject is distinct (a question has one answer). The output is a pure function of
``(n, seed, split)``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from memlm.core.errors import MemLMError

SPLITS = ("train", "eval")
PROMPT_STYLES = ("cloze", "question")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "qu", "th", "dr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "l", "r", "s", "th", "x")
_COLOURS = {
    "train": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
    "eval": ("silver", "teal", "amber", "violet", "crimson", "ivory", "indigo", "scarlet"),
}
_NUMBERS = {"train": (10, 60), "eval": (60, 100)}  # [low, high) per split

# relation -> (statement, question, value kind); {s} = subject, {v} = value
RELATIONS: dict[str, tuple[str, str, str]] = {
    "capital": ("The capital of {s} is {v}.", "What is the capital of {s}?", "name"),
    "leader": ("The leader of {s} is {v}.", "Who is the leader of {s}?", "name"),
    "river": ("The longest river in {s} is the {v}.", "What is the longest river in {s}?", "name"),
    "pet": ("{s} has a pet named {v}.", "What is the name of the pet of {s}?", "name"),
    "colour": ("The flag of {s} is {v}.", "What colour is the flag of {s}?", "colour"),
    "age": ("{s} is {v} years old.", "How old is {s}?", "number"),
}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    value: str
    text: str
    question: str

    @property
    def answer(self) -> str:
        return self.value

    @property
    def cloze(self) -> str:
        """The statement up to its value ("The capital of Zorbia is"): the answer prefix a
        cloze-style prompt ends with, so that the answer is the very next words."""
        return self.text[: self.text.rindex(self.value)].rstrip()

    def prompt(self, style: str = "cloze") -> str:
        """The question as asked: ``"question"`` alone ("What is the capital of Zorbia?"), or
        ``"cloze"``: the question, then the answer prefix ("... of Zorbia? The capital of Zorbia is")."""
        if style not in PROMPT_STYLES:
            raise MemLMError(f"fact prompt style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
        return self.question if style == "question" else f"{self.question} {self.cloze}"


def name_split(name: str) -> str:
    """The split a name belongs to: a fixed hash of its lower-cased spelling."""
    return SPLITS[zlib.crc32(name.lower().encode()) % 2]


def _invent_name(rng: np.random.Generator) -> str:
    n_syll = int(rng.integers(2, 4))
    parts = [_ONSETS[int(rng.integers(len(_ONSETS)))] + _VOWELS[int(rng.integers(len(_VOWELS)))] for _ in range(n_syll)]
    name = "".join(parts) + _CODAS[int(rng.integers(len(_CODAS)))]
    return name.capitalize()


def _names(rng: np.random.Generator, split: str, used: set[str]):
    """Endless distinct names of ``split`` (rejection-sampled by :func:`name_split`)."""
    while True:
        name = _invent_name(rng)
        if name not in used and name_split(name) == split:
            used.add(name)
            yield name


def make_facts(n: int, seed: int, split: str = "train") -> list[Fact]:
    """``n`` facts over every relation in turn, with distinct subjects; deterministic in (n, seed, split)."""
    if split not in SPLITS:
        raise MemLMError(f"fact split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise MemLMError(f"number of facts must be an integer >= 0, got {n!r}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split)])
    names = _names(rng, split, set())
    relations = list(RELATIONS)
    lo, hi = _NUMBERS[split]
    facts = []
    for i in range(int(n)):
        rel = relations[int(rng.integers(len(relations)))] if i >= len(relations) else relations[i]
        statement, question, kind = RELATIONS[rel]
        subject = next(names)
        if kind == "name":
            value = next(names)
        elif kind == "colour":
            value = _COLOURS[split][int(rng.integers(len(_COLOURS[split])))]
        else:
            value = str(int(rng.integers(lo, hi)))
        facts.append(Fact(subject, rel, value, statement.format(s=subject, v=value), question.format(s=subject)))
    return facts
