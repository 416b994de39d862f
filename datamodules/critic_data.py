"""Stage-4 critic data: (query, response, facts) triples built from the synthetic facts.

For each fact ``f`` (``datamodules/facts.py``) with a distractor fact ``d`` of another subject:

- **correct** (label 1): the question of ``f``, its true value, facts = ``f`` and ``d``;
- one negative (label 0), by kind:
  - ``wrong_number``: a numeric value moved by 1..9 (the age facts), facts = ``f`` and ``d``;
  - ``swapped_entity``: the value of ``d`` (present in the facts, but bound to another
    subject), facts = ``f`` and ``d``;
  - ``unsupported``: the true value, but the facts hold only other subjects (``d`` and a
    second distractor): nothing given supports the claim.

Numbers get ``wrong_number``; the other facts alternate ``swapped_entity`` and
``unsupported``. Two options make the triples look like a cloze-prompted model's answers:

- ``response="statement"``: a response is the rest of the statement after its cloze, as
  the model completes "Zorbia is" ("34 years old", not "34"); ``"value"`` (default) is the
  bare value;
- ``same_relation_swaps=True``: the ``swapped_entity`` value comes from another subject's
  fact of the same relation (the confusion a reader actually makes: another capital, not a
  colour), and that fact is the context's distractor;
- ``single_fact=p``: with probability p a triple's context is one fact alone (the subject's
  for ``correct`` and ``wrong_number``, the other subject's for the rest), as a verifier that
  retrieves one item per claim sees it. The order of the facts in the context is random. Training triples use the
``train`` split of names and validation the held-out ``eval`` split, so no entity of the
validation set was seen in training. Everything is a pure function of (n_facts, seed, split).
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from memlm.core.checks import require_positive
from memlm.core.errors import MemLMError
from memlm.datamodules.facts import RELATIONS, Fact, make_facts

KINDS = ("correct", "swapped_entity", "wrong_number", "unsupported")


@dataclass(frozen=True)
class CriticExample:
    query: str
    response: str
    facts: str
    label: int  # 1 = correct and supported by the facts
    kind: str  # one of KINDS


def _wrong_number(value: str, rng: np.random.Generator) -> str:
    delta = int(rng.integers(1, 10))
    v = int(value)
    return str(v - delta if rng.random() < 0.5 and v - delta >= 0 else v + delta)


def _statement_rest(f: Fact, value: str) -> str:
    """What follows ``f``'s cloze when its statement holds ``value`` ("34 years old")."""
    text = RELATIONS[f.relation][0].format(s=f.subject, v=value)
    return text[len(f.cloze):].strip().rstrip(".").strip()


def make_critic_examples(n_facts: int, seed: int, split: str = "train", response: str = "value",
                         same_relation_swaps: bool = False, single_fact: float = 0.0) -> list[CriticExample]:
    """Two triples per fact (one correct, one corrupted); see the module docstring."""
    if n_facts < 3:
        raise MemLMError(f"critic data needs at least 3 facts (a fact and two distractors), got {n_facts}")
    if response not in ("value", "statement"):
        raise MemLMError(f"critic data response must be 'value' or 'statement', got {response!r}")
    if not 0.0 <= single_fact <= 1.0:
        raise MemLMError(f"critic data single_fact must be in [0, 1], got {single_fact}")
    facts = make_facts(n_facts, seed, split)
    rng = np.random.default_rng([int(seed), 7, 0 if split == "train" else 1])
    say = _statement_rest if response == "statement" else (lambda f, v: v)
    by_relation: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        by_relation.setdefault(f.relation, []).append(i)
    one = np.random.default_rng([int(seed), 11, 0 if split == "train" else 1])  # its own stream: the rest is unchanged

    def ctx(pair: list[str], alone: str) -> str:
        return alone if single_fact > 0 and one.random() < single_fact else " ".join(pair)

    out: list[CriticExample] = []
    alternate = 0
    for i, f in enumerate(facts):
        others = [j for j in range(len(facts)) if j != i]
        j, k = rng.choice(others, size=2, replace=False)
        d, e = facts[int(j)], facts[int(k)]
        context = [f.text, d.text] if rng.random() < 0.5 else [d.text, f.text]
        out.append(CriticExample(f.question, say(f, f.value), ctx(context, f.text), 1, "correct"))
        if RELATIONS[f.relation][2] == "number":
            out.append(CriticExample(f.question, say(f, _wrong_number(f.value, rng)), ctx(context, f.text), 0, "wrong_number"))
            continue
        if alternate % 2 == 0 and same_relation_swaps:
            peers = [p for p in by_relation[f.relation] if p != i and facts[p].value != f.value]
            if peers:
                d = facts[int(rng.choice(peers))]
                context = [f.text, d.text] if rng.random() < 0.5 else [d.text, f.text]
        if alternate % 2 == 0 and d.value != f.value:
            out.append(CriticExample(f.question, say(f, d.value), ctx(context, d.text), 0, "swapped_entity"))
            alternate += 1
        else:
            out.append(CriticExample(f.question, say(f, f.value), ctx([d.text, e.text], d.text), 0, "unsupported"))
            alternate += 1
    return out


def _pad(seqs: list[list[int]], pad: int, width: int | None = None) -> torch.Tensor:
    width = max(1, max((len(s) for s in seqs), default=1)) if width is None else width
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:width]
        if s:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def encode_examples(examples: list[CriticExample], tokenizer, pad_id: int) -> dict:
    """Right-padded token tensors ``query_ids``, ``response_ids``, ``fact_ids`` and float ``labels``."""
    return {
        "query_ids": _pad(tokenizer.encode_batch([x.query for x in examples]), pad_id),
        "response_ids": _pad(tokenizer.encode_batch([" " + x.response for x in examples]), pad_id),
        "fact_ids": _pad(tokenizer.encode_batch([x.facts for x in examples]), pad_id),
        "labels": torch.tensor([float(x.label) for x in examples]),
    }


class CriticDataModule(L.LightningDataModule):
    """Stage-4 batches of encoded triples. The tokenizer is the stage-1 data's (same spec, source
    and vocab_size as the run that trained the checkpoint), so the ids mean what the model learned."""

    def __init__(self, n_train_facts: int = 2000, n_val_facts: int = 300, seed: int = 1234, batch_size: int = 32,
                 source: str = "builtin", tokenizer: str = "bpe", vocab_size: int = 2048, cache_dir: str | None = None,
                 response: str = "value", same_relation_swaps: bool = False, single_fact: float = 0.0):
        super().__init__()
        require_positive("data", n_train_facts=n_train_facts, n_val_facts=n_val_facts, batch_size=batch_size)
        from memlm.datamodules.text import TextDataModule

        self._text = TextDataModule(source=source, tokenizer=tokenizer, vocab_size=vocab_size, cache_dir=cache_dir)
        self.n_train_facts, self.n_val_facts, self.seed, self.batch_size = n_train_facts, n_val_facts, seed, batch_size
        if response not in ("value", "statement"):
            raise MemLMError(f"data.response must be 'value' or 'statement', got {response!r}")
        if not 0.0 <= single_fact <= 1.0:
            raise MemLMError(f"data.single_fact must be in [0, 1], got {single_fact}")
        self.response, self.same_relation_swaps, self.single_fact = response, bool(same_relation_swaps), float(single_fact)
        self._examples: dict[str, list[CriticExample]] = {}

    @property
    def tokenizer(self):
        return self._text.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer.pad_id is not None else -1

    def examples(self, split: str) -> list[CriticExample]:
        if split not in self._examples:
            n = self.n_train_facts if split == "train" else self.n_val_facts
            self._examples[split] = make_critic_examples(n, self.seed, split, self.response, self.same_relation_swaps,
                                                         self.single_fact)
        return self._examples[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        tok, pad = self.tokenizer, self.pad_id
        return DataLoader(self.examples(split), batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=lambda xs: encode_examples(xs, tok, pad),
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("eval", False)


__all__ = ["CriticDataModule", "CriticExample", "Fact", "KINDS", "encode_examples", "make_critic_examples"]
