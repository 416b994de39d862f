"""HMST stage-2 data: sequences that need memory, each several attention windows long.

Every row is ``segments x block_size`` tokens, delivered as consecutive ``block_size`` chunks
(``stream=True``, ``first`` on the first chunk) so HMST carries its SSM state across them, and
its answer lies in the last chunk, more than one attention window after the clue. Three parts,
selectable with ``parts`` (one training batch is one part; parts take turns):

* ``documents``: a passage of the corpus, then the same passage again. Predicting the copy
  needs what was read ``segments/2`` windows earlier (validation scores only the copy:
  ``val/acc`` and ``val/loss`` of the first validation loader when it is the first part).
* ``recall``: passkey retrieval beyond the window — "The pass key is 4821. Remember it." at the
  start, corpus text in between, "What is the pass key? The pass key is" and the key at the end;
  logs ``val/recall_acc`` (a row is right when every key token is).
* ``facts``: seeded synthetic facts (:mod:`memlm.datamodules.facts`) at the start, then corpus
  text, then one question about them and its answer; train and validation facts use disjoint
  names. ``fact_prompt: cloze`` (default) follows the question with the answer prefix ("What
  is the capital of Zorbia? The capital of Zorbia is" Quelt.), ``question`` asks it bare. The first chunk is flagged ``write_memory``: HMST ingests it into semantic memory (in
  validation too, removing those items afterwards), so the question can read the fact back.
  Logs ``val/fact_em`` (exact match of the answer tokens).

Validation has one loader per part (``val_names`` = ``parts``), so the LanguageModel base also
logs ``val/acc_recall``, ``val/acc_facts``. The tokenizer is the corpus one (``source``,
``tokenizer``, ``vocab_size`` as in the stage-1 config, hence the same ids as the stage-1
checkpoint). Training rows are fresh each epoch (seeded by ``[seed, epoch, rank]``); the
validation set is fixed.
"""
from __future__ import annotations

import lightning as L
import numpy as np

from memlm.core.checks import require_positive
from memlm.core.errors import MemLMError
from memlm.core.tokenizer import TextTokenizer
from memlm.datamodules.facts import PROMPT_STYLES, make_facts
from memlm.datamodules.recall import IGNORE, PASSKEY_QUESTION, _RecallLoader
from memlm.datamodules.text import TextDataModule

PARTS = ("documents", "recall", "facts")
EM_METRIC = {"recall": "recall_acc", "facts": "fact_em"}


class _TaskLoader(_RecallLoader):
    """Chunked rows plus the part's metric name and the ingest flag on the first chunk."""

    def __init__(self, *args, tasks: list[str], **kw):
        super().__init__(*args, **kw)
        self.tasks = tasks  # the part of each batch group (train: parts in turn)

    def make_batch(self, epoch: int, index: int) -> dict:
        batch = super().make_batch(epoch, index)
        task = self.tasks[(index // self.n_chunks(epoch)) % len(self.tasks)]
        batch["task"] = task
        if task in EM_METRIC:
            batch["em_metric"] = EM_METRIC[task]
        batch["write_memory"] = task == "facts" and batch["first"]
        return batch


class HMSTStage2DataModule(L.LightningDataModule):
    def __init__(
        self,
        parts: list[str] | None = None,
        source: str = "builtin",
        tokenizer: str = "bpe",
        vocab_size: int = 2048,
        block_size: int = 128,
        segments: int = 4,
        batch_size: int = 8,
        train_rows: int = 512,
        val_rows: int = 32,
        facts_per_row: int = 3,
        fact_prompt: str = "cloze",
        max_key: int = 99999,
        seed: int = 1234,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.parts = list(PARTS if parts is None else parts)
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise MemLMError(f"data.parts must be a non-empty subset of {list(PARTS)}, got {parts}")
        require_positive("data", block_size=block_size, segments=segments, batch_size=batch_size, train_rows=train_rows,
                         val_rows=val_rows, facts_per_row=facts_per_row, max_key=max_key)
        if segments < 2:
            raise MemLMError(f"data.segments must be >= 2 so that answers lie beyond the attention window, got {segments}")
        self.block_size, self.segments, self.batch_size = block_size, segments, batch_size
        self.train_rows, self.val_rows, self.facts_per_row, self.max_key = train_rows, val_rows, facts_per_row, max_key
        if fact_prompt not in PROMPT_STYLES:
            raise MemLMError(f"data.fact_prompt must be one of {', '.join(PROMPT_STYLES)}, got {fact_prompt!r}")
        self.fact_prompt = fact_prompt
        self.seed = seed
        self.text = TextDataModule(source=source, tokenizer=tokenizer, vocab_size=vocab_size, block_size=block_size,
                                   batch_size=batch_size, seed=seed, cache_dir=cache_dir)
        self.val_names = list(self.parts)

    # -- tokenizer --------------------------------------------------------------------
    @property
    def tokenizer(self) -> TextTokenizer:
        return self.text.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def length(self) -> int:
        return self.segments * self.block_size

    def prepare_data(self) -> None:
        self.text.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.text.setup(stage)

    # -- rows (pure functions of an rng) ----------------------------------------------
    def _filler(self, rng: np.random.Generator, ids: np.ndarray, n: int) -> list[int]:
        start = int(rng.integers(0, max(1, len(ids) - n - 1)))
        return [int(t) for t in ids[start:start + n]]

    def _row(self, rng, part: str, split: str, corpus: np.ndarray, fact_seed: int):
        """(tokens [length + 1], index of the first scored target or None = all scored in training)."""
        enc = self.tokenizer.encode
        L1 = self.length + 1
        if part == "documents":
            half = L1 // 2
            passage = self._filler(rng, corpus, half)
            toks = (passage + passage)[:L1]
            toks += self._filler(rng, corpus, L1 - len(toks))
            return toks, half  # the copy starts at token ``half``
        if part == "recall":
            key = str(int(rng.integers(1, self.max_key + 1)))
            head = enc(f"The pass key is {key}. Remember it. {key} is the pass key. ")
            tail_q, answer = enc(PASSKEY_QUESTION.rstrip()), enc(" " + key)
        else:
            facts = make_facts(self.facts_per_row, fact_seed, split)
            head = enc(" ".join(f.text for f in facts) + " ")
            asked = facts[int(rng.integers(len(facts)))]
            tail_q, answer = enc(" " + asked.prompt(self.fact_prompt)), enc(" " + asked.answer + ".")
        n_mid = L1 - len(head) - len(tail_q) - len(answer)
        if n_mid < self.block_size:
            raise MemLMError(f"data.segments={self.segments} x block_size={self.block_size} is too short for the "
                             f"{part} rows; raise data.segments")
        toks = head + self._filler(rng, corpus, n_mid) + tail_q + answer
        return toks, L1 - len(answer)

    def _rows(self, part: str, split: str, n: int, seed) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        corpus = np.asarray(self.text.split_ids("train" if split == "train" else "val"))
        x = np.empty((n, self.length), dtype=np.int64)
        y = np.full((n, self.length), IGNORE, dtype=np.int64)
        for i in range(n):
            toks, first_scored = self._row(rng, part, split, corpus, fact_seed=int(rng.integers(2**31)))
            arr = np.asarray(toks[: self.length + 1], dtype=np.int64)
            x[i] = arr[:-1]
            # training scores every token (the answers and the rest of the language); validation
            # only the part that needs memory
            lo = 0 if split == "train" and part == "documents" else first_scored - 1
            y[i, lo:] = arr[lo + 1:]
        return x, y

    # -- loaders ----------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._rank_world()
        groups = max(1, self.train_rows // self.batch_size)
        per_part = (groups + len(self.parts) - 1) // len(self.parts)
        B = self.batch_size

        def rows(epoch: int):
            made = {p: self._rows(p, "train", per_part * B, [self.seed, epoch, rank, k]) for k, p in enumerate(self.parts)}
            order = [(self.parts[g % len(self.parts)], g // len(self.parts)) for g in range(groups)]
            x = np.concatenate([made[p][0][j * B:(j + 1) * B] for p, j in order])
            y = np.concatenate([made[p][1][j * B:(j + 1) * B] for p, j in order])
            return x, y

        epoch_fn = lambda: self.trainer.current_epoch if self.trainer is not None else 0  # noqa: E731
        return _TaskLoader(rows, groups * B, self.length, B, self.block_size, epoch_fn, tasks=self.parts)

    def val_dataloader(self):
        rank, world = self._rank_world()
        loaders = []
        for k, part in enumerate(self.parts):
            n = max(1, self.val_rows // world)
            made = self._rows(part, "eval", n, [self.seed, 10**6, rank, k])
            loaders.append(_TaskLoader(lambda _e, made=made: made, n, self.length, min(self.batch_size, n),
                                       self.block_size, fixed=True, tasks=[part]))
        return loaders

    test_dataloader = val_dataloader
