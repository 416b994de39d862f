"""A vocabulary that is learned from exposure, one utterance at a time.

It starts from three special units (``<eos>``, ``<unk>``, ``<bos>``), the most frequent characters and a
few syllable-like units (``initial_vocab_size`` of them in all, at most the 171 seeds
defined here). Every observed utterance is
segmented greedily (longest known unit first); adjacent unit pairs are counted and a pair
seen ``merge_threshold`` times becomes a new unit (at most ``max_new_units_per_text`` per
utterance). Characters never seen before become units the first time they appear.

Ids are stable: a unit keeps its id for life and an id is never reused after the unit is
removed, so the network's column for a unit never changes meaning. When the vocabulary is
full (``max_vocab_size`` live units) a new merge may evict the least used learned unit;
:meth:`forget` removes learned units whose (exponentially decayed) usage fell below a floor.
Characters and specials are never forgotten, so every text stays encodable.

Merged units are word pieces: a space may only lead a unit (" cat"), and a unit is either
all letters/digits/apostrophes or all punctuation, so units never straddle words.
"""
from __future__ import annotations

import json
import math

from memlm.core.errors import MemLMError

EOS = "<eos>"
UNK = "<unk>"
BOS = "<bos>"
EOS_ID = 0
UNK_ID = 1
BOS_ID = 2
SPECIAL_UNITS = (EOS, UNK, BOS)

# Base characters, most frequent English first, so a small initial_vocab_size keeps the useful ones.
BASE_CHARS = (
    " etaoinshrdlcumwfgypbvkjxqz"
    ".,'?!-:;\"()"
    "TAISOWHBCMDNPRFLGEYUVJKQXZ"
    "0123456789"
    "\n/&%$#@*+=<>[]_{}|~`^\\"
)
# Frequent English bigrams / trigrams: the "syllable-like" seed units.
SYLLABLES = (
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of",
    "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le",
    "ve", "co", "me", "de", "hi", "ri", "ro", "ic", "ne", "ea", "ra", "ce", "li", "ch", "ll",
    "be", "ma", "si", "om", "ur", "the", "ing", "and", "ion", "ent", "for", "tio", "ere", "her",
    "ate", "ter", "hat", "tha", "ers", "his", "res", "ill", "are", "con", "nce", "all", "eve",
)

KIND_SPECIAL, KIND_CHAR, KIND_SYLLABLE, KIND_MERGED = "special", "char", "syllable", "merged"


def _mergeable(text: str, max_len: int) -> bool:
    """Whether ``text`` may become a unit: a word piece, optionally led by one space."""
    if not text or len(text) > max_len or "\n" in text:
        return False
    core = text[1:] if text[0] == " " else text
    if not core or " " in core:
        return False
    wordish = all(ch.isalnum() or ch == "'" for ch in core)
    punct = all(not ch.isalnum() and not ch.isspace() for ch in core)
    return wordish or punct


class GrowingVocab:
    """Units learned online; see the module docstring for the rules."""

    def __init__(
        self,
        initial_vocab_size: int = 128,
        max_vocab_size: int = 2048,
        merge_threshold: int = 3,
        max_unit_len: int = 12,
        max_new_units_per_text: int = 4,
        usage_half_life: float = 5000.0,
        forget_below: float = 0.5,
        max_pair_entries: int = 50_000,
    ) -> None:
        if max_vocab_size < len(SPECIAL_UNITS) + 1:
            raise MemLMError(f"max_vocab_size must be at least {len(SPECIAL_UNITS) + 1}, got {max_vocab_size}")
        if initial_vocab_size < len(SPECIAL_UNITS):
            raise MemLMError(f"initial_vocab_size must be at least {len(SPECIAL_UNITS)}, got {initial_vocab_size}")
        self.initial_vocab_size = int(min(initial_vocab_size, max_vocab_size))
        self.max_vocab_size = int(max_vocab_size)
        self.merge_threshold = max(1, int(merge_threshold))
        self.max_unit_len = max(2, int(max_unit_len))
        self.max_new_units_per_text = max(0, int(max_new_units_per_text))
        self.usage_half_life = float(usage_half_life)
        self.forget_below = float(forget_below)
        self.max_pair_entries = int(max_pair_entries)

        self.units: dict[int, str] = {}
        self.kinds: dict[int, str] = {}
        self.lookup: dict[str, int] = {}
        self.usage: dict[int, float] = {}  # decayed usage count, valid at usage_step[id]
        self.usage_step: dict[int, int] = {}
        self.pair_counts: dict[tuple[int, int], float] = {}
        self.next_id = 0
        self.step = 0  # number of observed texts
        self.removed: list[int] = []
        self._max_len = 1
        self._evict_queue: list[int] | None = None  # cached usage ranking (persisted for exact resume)
        self._evict_built = 0
        self._evict_pos = 0

        for s in SPECIAL_UNITS:
            self._add(s, KIND_SPECIAL)
        seeds = [(c, KIND_CHAR) for c in BASE_CHARS] + [(s, KIND_SYLLABLE) for s in SYLLABLES]
        for s, kind in seeds[: self.initial_vocab_size - len(SPECIAL_UNITS)]:
            self._add(s, kind)

    # -- bookkeeping ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.units)

    @property
    def id_space(self) -> int:
        """Number of ids ever allocated (live and retired); the network has one column per id."""
        return self.next_id

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def _add(self, text: str, kind: str) -> int:
        uid = self.next_id
        self.next_id += 1
        self.units[uid] = text
        self.kinds[uid] = kind
        if kind != KIND_SPECIAL:  # specials are never matched from text
            self.lookup[text] = uid
        self.usage[uid] = 0.0
        self.usage_step[uid] = self.step
        self._max_len = max(self._max_len, len(text)) if kind != KIND_SPECIAL else self._max_len
        return uid

    def _decay(self, steps: int) -> float:
        if self.usage_half_life <= 0:
            return 1.0
        return math.exp(-math.log(2.0) * steps / self.usage_half_life)

    def usage_of(self, uid: int) -> float:
        return self.usage.get(uid, 0.0) * self._decay(self.step - self.usage_step.get(uid, self.step))

    def remove(self, uid: int) -> None:
        """Retire a learned unit; its id is never reused."""
        if self.kinds.get(uid) != KIND_MERGED:
            raise MemLMError(f"unit {uid} is not a learned unit; only merged units can be removed")
        text = self.units.pop(uid)
        self.kinds.pop(uid)
        self.lookup.pop(text, None)
        self.usage.pop(uid, None)
        self.usage_step.pop(uid, None)
        self.removed.append(uid)
        # pair counts that mention uid are dropped lazily (observe() skips pairs of removed units)

    def forget(self, below: float | None = None) -> list[int]:
        """Remove learned units whose decayed usage is below ``below`` (default ``forget_below``)."""
        floor = self.forget_below if below is None else float(below)
        gone = [u for u, k in list(self.kinds.items()) if k == KIND_MERGED and self.usage_of(u) < floor]
        for u in gone:
            self.remove(u)
        return gone

    # -- segmentation -----------------------------------------------------------------
    def encode(self, text: str, grow: bool = False) -> list[int]:
        """Greedy longest-match segmentation. Unknown characters become new units if ``grow``."""
        out: list[int] = []
        lookup = self.lookup
        i, n = 0, len(text)
        while i < n:
            for length in range(min(self._max_len, n - i), 0, -1):
                uid = lookup.get(text[i : i + length])
                if uid is not None:
                    out.append(uid)
                    i += length
                    break
            else:
                ch = text[i]
                if grow and len(self.units) < self.max_vocab_size:
                    out.append(self._add(ch, KIND_CHAR))
                else:
                    out.append(UNK_ID)
                i += 1
        return out

    def decode(self, ids, skip_special: bool = True) -> str:
        parts = []
        for i in ids:
            i = int(i)
            kind = self.kinds.get(i)
            if kind is None or (skip_special and kind == KIND_SPECIAL):
                continue
            parts.append(self.units[i])
        return "".join(parts)

    def unit_text(self, uid: int) -> str | None:
        return self.units.get(int(uid))

    # -- learning ---------------------------------------------------------------------
    def observe(self, text: str) -> tuple[list[int], list[int]]:
        """Learn from one utterance. Returns (new unit ids, removed unit ids)."""
        self.step += 1
        before = self.next_id
        ids = self.encode(text, grow=True)
        new_units = list(range(before, self.next_id))
        removed: list[int] = []
        for u in ids:
            self.usage[u] = self.usage_of(u) + 1.0
            self.usage_step[u] = self.step
        counts = self.pair_counts
        candidates = set()
        for a, b in zip(ids, ids[1:]):
            if a <= BOS_ID or b <= BOS_ID:
                continue
            c = counts.get((a, b), 0.0) + 1.0
            counts[(a, b)] = c
            if c >= self.merge_threshold:
                candidates.add((a, b))
        if len(counts) > self.max_pair_entries:
            units = self.units
            self.pair_counts = counts = {
                p: c / 2 for p, c in counts.items() if c >= 2 and p[0] in units and p[1] in units
            }
        # pairs of this utterance that reached the threshold, most frequent first
        ready = sorted(((counts[p], p) for p in candidates if p in counts), key=lambda cp: (-cp[0], cp[1]))
        made = 0
        in_text = set(ids)
        for c, (a, b) in ready:
            if made >= self.max_new_units_per_text:
                break
            if a not in self.units or b not in self.units:
                counts.pop((a, b), None)
                continue
            text_ab = self.units[a] + self.units[b]
            if text_ab in self.lookup or not _mergeable(text_ab, self.max_unit_len):
                counts.pop((a, b), None)
                continue
            if len(self.units) >= self.max_vocab_size:
                # evict only a unit used clearly less than the new pair (hysteresis against churn)
                victim = self._eviction_candidate(exclude=in_text, below=c / 2.0)
                if victim is None:
                    break
                self.remove(victim)
                removed.append(victim)
            counts.pop((a, b), None)
            uid = self._add(text_ab, KIND_MERGED)
            self.usage[uid] = float(c)
            new_units.append(uid)
            made += 1
        return new_units, removed

    def _eviction_candidate(self, exclude: set[int], below: float) -> int | None:
        """The least used learned unit if its usage is below ``below``. The usage ranking is
        rebuilt every 100 observations (amortised; a stale entry is re-checked before use)."""
        if self._evict_queue is None or self.step - self._evict_built >= 100 or self._evict_pos >= len(self._evict_queue):
            merged = [u for u, k in self.kinds.items() if k == KIND_MERGED]
            self._evict_queue = sorted(merged, key=lambda u: (self.usage_of(u), u))
            self._evict_built, self._evict_pos = self.step, 0
        queue = self._evict_queue
        while self._evict_pos < len(queue):
            u = queue[self._evict_pos]
            if u not in self.units or u in exclude:
                self._evict_pos += 1
                continue
            if self.usage_of(u) < below:
                self._evict_pos += 1
                return u
            return None
        return None

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes per id (specials: <eos> stands for one separator byte, others 0)."""
        out = [0] * self.next_id
        for i, t in self.units.items():
            out[i] = 1 if i == EOS_ID else (0 if self.kinds[i] == KIND_SPECIAL else len(t.encode("utf-8")))
        return out

    # -- persistence ------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "settings": {
                    "initial_vocab_size": self.initial_vocab_size,
                    "max_vocab_size": self.max_vocab_size,
                    "merge_threshold": self.merge_threshold,
                    "max_unit_len": self.max_unit_len,
                    "max_new_units_per_text": self.max_new_units_per_text,
                    "usage_half_life": self.usage_half_life,
                    "forget_below": self.forget_below,
                    "max_pair_entries": self.max_pair_entries,
                },
                "units": [
                    [i, self.units[i], self.kinds[i], self.usage[i], self.usage_step[i]] for i in sorted(self.units)
                ],
                "pairs": [[a, b, c] for (a, b), c in self.pair_counts.items()],
                "next_id": self.next_id,
                "step": self.step,
                "removed": self.removed,
                "evict": [self._evict_built, self._evict_pos, self._evict_queue],
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, payload: str) -> "GrowingVocab":
        try:
            data = json.loads(payload)
            vocab = cls(**data["settings"])
            vocab.units, vocab.kinds, vocab.lookup, vocab.usage, vocab.usage_step = {}, {}, {}, {}, {}
            for i, text, kind, use, step in data["units"]:
                vocab.units[i], vocab.kinds[i] = text, kind
                if kind != KIND_SPECIAL:
                    vocab.lookup[text] = i
                vocab.usage[i], vocab.usage_step[i] = float(use), int(step)
            vocab.pair_counts = {(int(a), int(b)): float(c) for a, b, c in data["pairs"]}
            vocab.next_id = int(data["next_id"])
            vocab.step = int(data["step"])
            vocab.removed = [int(i) for i in data["removed"]]
            built, pos, queue = data.get("evict", [0, 0, None])
            vocab._evict_built, vocab._evict_pos = int(built), int(pos)
            vocab._evict_queue = [int(i) for i in queue] if queue is not None else None
        except (ValueError, KeyError, TypeError) as exc:
            raise MemLMError(f"corrupt Hebbian vocabulary payload ({exc}); delete the state file to start afresh") from exc
        vocab._max_len = max(
            (len(t) for i, t in vocab.units.items() if vocab.kinds[i] != KIND_SPECIAL), default=1
        )
        return vocab

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha1(self.to_json().encode()).hexdigest()[:12]
