"""Conversation / utterance streams for online learners (the Hebbian continual learner).

Items are raw strings, not token ids: the learner grows its own vocabulary while it reads.
A dialogue is one string whose turns are joined by ``TURN_SEPARATOR`` (ASCII record
separator ``\\x1e``); a plain utterance is a string without it. ``train_dataloader`` yields
batches (lists) of such strings in file order (online learning sees the stream as it is).

Sources
    ``builtin``  sentences and question/answer dialogues from a small template grammar over a
                 fixed, seeded "world" of facts (offline, no download; facts stay consistent,
                 so there is something to learn and to recall);
    ``pydoc``    sentences from CPython's ``pydoc_data`` documentation text (offline);
    a path       a ``.jsonl`` file of dialogues (``{"user": .., "assistant": ..}`` or
                 ``{"messages": [{"role": .., "content": ..}, ..]}`` or ``{"text": ..}``
                 per line), or a plain-text file (one utterance per non-empty line, long
                 lines cut at sentence ends), or a directory of such files.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from memlm.core.checks import require_positive
from memlm.core.errors import MemLMError

TURN_SEPARATOR = "\x1e"
MAX_UTTERANCE_CHARS = 300

# -- the builtin template grammar ------------------------------------------------------
_ANIMALS = ["cat", "dog", "bird", "fox", "horse", "mouse", "cow", "duck", "frog", "bear", "lion", "goat"]
_FOODS = ["fish", "bones", "seeds", "berries", "hay", "cheese", "grass", "bread", "flies", "honey", "meat", "apples"]
_COLORS = ["black", "brown", "red", "white", "grey", "green", "yellow", "orange"]
_PLACES = ["house", "garden", "tree", "barn", "pond", "forest", "field", "hill"]
_OBJECTS = ["mat", "bed", "box", "rug", "chair", "log", "wall", "step"]
_VERBS_PAST = ["sat on", "slept on", "jumped on", "ran to", "looked at", "walked to"]
_NAMES = ["anna", "ben", "clara", "david", "emma", "felix", "grace", "hugo"]
_GREETINGS = [
    ("hello", "hello! how are you?"),
    ("hi", "hi there!"),
    ("how are you?", "i am fine, thank you."),
    ("good morning", "good morning to you too."),
    ("thank you", "you are welcome."),
    ("goodbye", "goodbye, see you soon."),
]


def builtin_items(n_items: int = 2000, seed: int = 0) -> list[str]:
    """Sentences and dialogues about a seeded world whose facts never change."""
    rng = random.Random(seed)
    foods = _FOODS[:]
    rng.shuffle(foods)
    colors = [rng.choice(_COLORS) for _ in _ANIMALS]
    homes = [rng.choice(_PLACES) for _ in _ANIMALS]
    food = dict(zip(_ANIMALS, foods))
    color = dict(zip(_ANIMALS, colors))
    home = dict(zip(_ANIMALS, homes))
    pets = {n: rng.choice(_ANIMALS) for n in _NAMES}
    items: list[str] = []
    for _ in range(n_items):
        a = rng.choice(_ANIMALS)
        kind = rng.random()
        if kind < 0.30:
            items.append(f"the {a} {rng.choice(_VERBS_PAST)} the {rng.choice(_OBJECTS)}.")
        elif kind < 0.45:
            items.append(rng.choice([f"the {a} eats {food[a]}.", f"the {a} is {color[a]}.", f"the {a} lives in the {home[a]}."]))
        elif kind < 0.80:
            q, r = rng.choice(
                [
                    (f"what does the {a} eat?", f"the {a} eats {food[a]}."),
                    (f"what color is the {a}?", f"the {a} is {color[a]}."),
                    (f"where does the {a} live?", f"the {a} lives in the {home[a]}."),
                ]
            )
            items.append(q + TURN_SEPARATOR + r)
        elif kind < 0.90:
            n = rng.choice(_NAMES)
            items.append(f"who has a {pets[n]}?" + TURN_SEPARATOR + f"{n} has a {pets[n]}.")
        else:
            q, r = rng.choice(_GREETINGS)
            items.append(q + TURN_SEPARATOR + r)
    return items


def pydoc_items(max_items: int | None = None) -> list[str]:
    from pydoc_data.topics import topics

    out: list[str] = []
    for name in sorted(topics):
        out += split_utterances(topics[name])
        if max_items and len(out) >= max_items:
            return out[:max_items]
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_utterances(text: str) -> list[str]:
    """Non-empty lines; long lines cut at sentence ends and then at MAX_UTTERANCE_CHARS."""
    out: list[str] = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        for sent in _SENTENCE_END.split(line) if len(line) > MAX_UTTERANCE_CHARS else [line]:
            while len(sent) > MAX_UTTERANCE_CHARS:
                cut = sent.rfind(" ", 0, MAX_UTTERANCE_CHARS)
                cut = cut if cut > 0 else MAX_UTTERANCE_CHARS
                out.append(sent[:cut])
                sent = sent[cut:].strip()
            if sent:
                out.append(sent)
    return out


def parse_jsonl_line(line: str, where: str) -> str | None:
    """One JSONL record -> a dialogue string (turns joined by TURN_SEPARATOR)."""
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise MemLMError(f"{where} is not valid JSON ({exc.msg}); each line must be one JSON object") from exc
    if not isinstance(rec, dict):
        raise MemLMError(f"{where} must be a JSON object with user/assistant, messages or text")
    turns: list[str]
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise MemLMError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        turns = [str(m.get("content", "")) for m in msgs if isinstance(m, dict) and m.get("role") != "system"]
    elif "user" in rec or "assistant" in rec:
        turns = [str(rec.get("user", "")), str(rec.get("assistant", ""))]
    elif "text" in rec:
        turns = [str(rec["text"])]
    else:
        raise MemLMError(f"{where} has none of the keys user/assistant, messages or text")
    turns = [" ".join(t.replace(TURN_SEPARATOR, " ").split()) for t in turns]
    turns = [t for t in turns if t]
    return TURN_SEPARATOR.join(turns) if turns else None


def read_items(path: str | Path, fmt: str = "auto") -> list[str]:
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".txt", ".json", ""))
        if not files:
            raise MemLMError(f"no .jsonl or .txt files in {path}")
        return [item for f in files for item in read_items(f, fmt)]
    if not path.is_file():
        raise MemLMError(f"conversation data not found: {path}; pass a .jsonl/.txt file, a directory, or source=builtin")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MemLMError(f"{path} is not valid UTF-8; convert it to UTF-8") from exc
    kind = fmt if fmt != "auto" else ("jsonl" if path.suffix in (".jsonl", ".json") else "text")
    if kind == "jsonl":
        items = [parse_jsonl_line(line, f"{path}:{i + 1}") for i, line in enumerate(text.splitlines())]
        items = [x for x in items if x]
    elif kind == "text":
        items = split_utterances(text)
    else:
        raise MemLMError(f"unknown data.format {fmt!r}: use auto, jsonl or text")
    if not items:
        raise MemLMError(f"{path} holds no utterances")
    return items


def collate_strings(batch: list[str]) -> list[str]:
    return list(batch)


class ConversationDataModule(L.LightningDataModule):
    """Raw utterance / dialogue strings for online learners.

    Args:
        source: ``builtin`` (template grammar), ``pydoc`` (CPython docs sentences) or a path.
        format: ``auto`` (by suffix), ``jsonl`` or ``text`` for path sources.
        batch_size: strings per training batch (learned one after another, in order).
        val_fraction: every k-th item (k = 1/val_fraction) goes to validation.
        max_items: cap on the number of items read.
        builtin_items: size of the builtin corpus.
        vocab_size: the learner's vocabulary cap; linked to ``model.init_args.vocab_size``.
        shuffle: shuffle training items each epoch (default off: the stream order is kept).
    """

    def __init__(
        self,
        source: str = "builtin",
        format: str = "auto",
        batch_size: int = 8,
        val_fraction: float = 0.05,
        max_items: int | None = None,
        builtin_items: int = 2000,
        vocab_size: int = 2048,
        shuffle: bool = False,
        seed: int = 0,
        max_val_items: int | None = 200,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise MemLMError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        require_positive("data", batch_size=batch_size, vocab_size=vocab_size, builtin_items=builtin_items)
        self.source, self.format = source, format
        self.batch_size, self.val_fraction = int(batch_size), float(val_fraction)
        self.max_items, self.n_builtin = max_items, int(builtin_items)
        self._vocab_size = int(vocab_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.max_val_items = max_val_items
        self.tokenizer = None  # the learner grows its own vocabulary
        self._splits: dict[str, list[str]] | None = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def items(self) -> list[str]:
        if self.source == "builtin":
            items = builtin_items(self.n_builtin, self.seed)
        elif self.source == "pydoc":
            items = pydoc_items(self.max_items)
        else:
            items = read_items(self.source, self.format)
        return items[: self.max_items] if self.max_items else items

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        items = self.items()
        train, val = [], []
        k = int(round(1.0 / self.val_fraction)) if self.val_fraction > 0 else 0
        for i, it in enumerate(items):
            (val if k and i % k == k - 1 else train).append(it)
        if self.max_val_items is not None:
            val = val[: self.max_val_items]
        if not train:
            raise MemLMError("no training utterances; lower data.val_fraction or give more data")
        self._splits = {"train": train, "val": val or train[: max(1, len(train) // 20)]}

    def split(self, name: str) -> list[str]:
        self.setup()
        return self._splits[name]

    def train_dataloader(self):
        import torch

        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.split("train"), batch_size=self.batch_size, shuffle=self.shuffle, generator=g if self.shuffle else None,
            collate_fn=collate_strings, num_workers=0,
        )

    def val_dataloader(self):
        return DataLoader(self.split("val"), batch_size=self.batch_size, shuffle=False, collate_fn=collate_strings, num_workers=0)

    def test_dataloader(self):
        return self.val_dataloader()
