"""Synthetic long-context recall: multi-query associative recall (MQAR) and passkey retrieval.

Both tasks are generated from a seed (training data is fresh every epoch, seeded by
``[seed, epoch, rank]``; validation sets are fixed), and only answer positions carry a target
(``-100`` elsewhere), so ``val/acc`` is recall accuracy. One validation dataloader per evaluation
length: ``val_names = ["len128", "len512", ...]`` (the first is the training length), which the
LanguageModel base logs as ``val/acc`` (training length) and ``val/acc_len512`` etc.

**MQAR** (Zoology): ``k v k v ... k v`` (``num_kv_pairs`` distinct keys with random values), then
filler ``.`` tokens with every key queried once at a random position: input ``k``, target its value
``v``. Longer evaluation lengths keep the pairs and push the queries further away. Tokens are words
(``k0`` .. ``v63`` ``.``) in a WordLevel tokenizer, so a prompt reads ``k3 v7 k9 v1 . . k3``.

**Passkey**: filler sentences with ``" The pass key is K. Remember it. K is the pass key. "`` at a
random depth, ending ``" What is the pass key? The pass key is K"``; targets are the digits of K.
Character tokenizer. Exact match = every digit of the answer predicted (greedy) correctly.

``stream_chunk``: for stateful models (HAMT), sequences are delivered as consecutive chunks of
``stream_chunk`` tokens (``stream=True``, ``first`` on the first chunk), so the model must carry its
memory across chunks to answer — the TBPTT setting. Without it a batch holds whole sequences.
"""
from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from memlm.datamodules.loaders import ResumableLoader
from memlm.core.tokenizer import SPECIALS, UNK, TextTokenizer, build_tokenizer
from memlm.core.checks import require_positive
from memlm.core.errors import MemLMError

IGNORE = -100
FILLER_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# ``filler: small``: a 3-character filler sharing no character with the key sentence or the question,
# so no filler context resembles "pass key is" and a content-keyed memory can learn to ignore it early
SMALL_FILLER = "~-="
PASSKEY_SENTENCE = " The pass key is {k}. Remember it. {k} is the pass key. "
PASSKEY_QUESTION = " What is the pass key? The pass key is "


# -- generators (pure functions of an rng) -------------------------------------------------
def mqar_tokens(num_keys: int, num_values: int) -> list[str]:
    return [f"k{i}" for i in range(num_keys)] + [f"v{i}" for i in range(num_values)] + ["."]


def make_mqar(
    rng: np.random.Generator, n: int, length: int, num_kv_pairs: int, num_keys: int, num_values: int, offset: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MQAR sequences of ``length`` inputs: (input_ids [n, L], targets [n, L]).

    Token ids: keys ``offset + [0, num_keys)``, values after them, filler last.
    """
    N = num_kv_pairs
    total = length + 1
    if 4 * N > total:
        raise MemLMError(f"MQAR length {length} is too short for {N} key-value pairs and their queries (need >= {4 * N - 1})")
    if N > num_keys:
        raise MemLMError(f"num_kv_pairs ({N}) must not exceed num_keys ({num_keys})")
    key0, val0, filler = offset, offset + num_keys, offset + num_keys + num_values
    keys = np.argsort(rng.random((n, num_keys)), axis=1)[:, :N] + key0  # distinct keys per row
    vals = rng.integers(0, num_values, size=(n, N)) + val0
    seq = np.full((n, total), filler, dtype=np.int64)
    seq[:, 0 : 2 * N : 2] = keys
    seq[:, 1 : 2 * N : 2] = vals
    slots = (total - 2 * N) // 2  # query slots of two tokens each in the tail
    chosen = np.sort(np.argsort(rng.random((n, slots)), axis=1)[:, :N], axis=1)
    qpos = 2 * N + 2 * chosen  # [n, N] positions of the query keys
    order = np.argsort(rng.random((n, N)), axis=1)  # which pair each query asks for
    rows = np.arange(n)[:, None]
    seq[rows, qpos] = keys[rows, order]
    seq[rows, qpos + 1] = vals[rows, order]
    x, y = seq[:, :-1], np.full((n, length), IGNORE, dtype=np.int64)
    y[rows, qpos] = seq[rows, qpos + 1]
    return x, y


def curriculum_length(step: int, total_steps: int, lengths: list[int], final_fraction: float = 0.5) -> int:
    """Training length at ``step`` of a curriculum that walks ``lengths`` (short first).

    The last length gets the final ``final_fraction`` of the steps; the earlier lengths share the rest
    equally. Short sequences put each answer close to its key, so the copy is learned before it must
    bridge the full distance.
    """
    if not lengths:
        raise MemLMError("a curriculum needs at least one length")
    if len(lengths) == 1:
        return int(lengths[0])
    start_final = int(round(total_steps * (1.0 - final_fraction)))
    if step >= start_final:
        return int(lengths[-1])
    stage = step * (len(lengths) - 1) // max(1, start_final)
    return int(lengths[min(stage, len(lengths) - 2)])


def passkey_texts(rng: np.random.Generator, n: int, length: int, max_key: int, depths: np.ndarray | None = None,
                  filler_text: str = FILLER_TEXT):
    """``n`` passkey documents of exactly ``length + 1`` characters: (texts, answer start index, keys)."""
    texts, starts, keys = [], [], []
    for i in range(n):
        k = str(int(rng.integers(1, max_key + 1)))
        sentence = PASSKEY_SENTENCE.format(k=k)
        fixed = len(sentence) + len(PASSKEY_QUESTION) + len(k)
        n_fill = length + 1 - fixed
        if n_fill < 0:
            raise MemLMError(f"passkey length {length} is too short; use at least {fixed} characters")
        depth = float(depths[i]) if depths is not None else float(rng.random())
        filler = (filler_text * (n_fill // len(filler_text) + 1))[:n_fill]
        cut = int(round(depth * n_fill))
        text = filler[:cut] + sentence + filler[cut:] + PASSKEY_QUESTION + k
        texts.append(text)
        starts.append(len(text) - len(k))
        keys.append(k)
    return texts, starts, keys


class _RecallLoader(ResumableLoader):
    """Batches of whole sequences, or (``chunk``) consecutive chunks of each group of sequences."""

    def __init__(self, make_rows, n_rows: int, length, batch_size: int, chunk: int | None, epoch_fn=None,
                 fixed: bool = False):
        super().__init__(epoch_fn)
        self.make_rows, self.n_rows, self.batch_size, self.chunk = make_rows, n_rows, batch_size, chunk
        # ``length`` is an int, or a function of the epoch (a length curriculum)
        self.length_fn = length if callable(length) else (lambda _epoch: length)
        self.fixed = fixed
        self._cache_epoch, self._cache = None, None

    def _rows(self, epoch: int):
        key = 0 if self.fixed else epoch
        if self._cache_epoch != key:
            self._cache = self.make_rows(key)
            self._cache_epoch = key
        return self._cache

    def _groups(self) -> int:
        return (self.n_rows + self.batch_size - 1) // self.batch_size

    def n_chunks(self, epoch: int) -> int:
        return self.length_fn(epoch) // self.chunk if self.chunk else 1

    def num_batches(self) -> int:
        return self._groups() * self.n_chunks(int(self.epoch_fn()))

    def make_batch(self, epoch: int, index: int) -> dict:
        x, y = self._rows(epoch)
        group, c = divmod(index, self.n_chunks(epoch))
        rows = slice(group * self.batch_size, (group + 1) * self.batch_size)
        if self.chunk is None:
            return {"input_ids": torch.from_numpy(x[rows]), "targets": torch.from_numpy(y[rows])}
        cols = slice(c * self.chunk, (c + 1) * self.chunk)
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(x[rows, cols])),
            "targets": torch.from_numpy(np.ascontiguousarray(y[rows, cols])),
            "stream": True,
            "first": c == 0,
            "chunk": c,
        }


class RecallDataModule(L.LightningDataModule):
    """MQAR or passkey recall with accuracy at answer positions and several evaluation lengths.

    Args:
        task: ``mqar`` or ``passkey``.
        seq_len: training sequence length (tokens).
        eval_lengths: evaluation lengths; the training length is always first (default: 1x and 4x).
        num_kv_pairs, num_keys, num_values: MQAR sizes.
        max_key: passkey K is drawn from 1..max_key.
        num_train: training sequences per epoch (fresh each epoch); num_val: per evaluation length.
        batch_size: sequences per batch (training length); longer evaluation batches hold
            ``max(1, batch_size * seq_len // length)`` sequences.
        stream_chunk: deliver sequences as consecutive chunks of this many tokens (stateful models).
        seed: everything is a function of it.
        filler: passkey filler, ``text`` (English sentences) or ``small`` (3 characters that never
            occur in the key sentence: learnable in a few hundred steps).
        curriculum: shorter training lengths used first, one per epoch (epoch e trains at
            ``curriculum[e]``, then at ``seq_len``); each must be at most ``seq_len``. Set
            ``trainer.reload_dataloaders_every_n_epochs: 1`` so Lightning re-reads the batch count.
    """

    def __init__(
        self,
        task: Literal["mqar", "passkey"] = "mqar",
        seq_len: int = 128,
        eval_lengths: list[int] | None = None,
        num_kv_pairs: int = 8,
        num_keys: int = 64,
        num_values: int = 64,
        max_key: int = 50000,
        num_train: int = 8192,
        num_val: int = 256,
        batch_size: int = 32,
        stream_chunk: int | None = None,
        seed: int = 1234,
        filler: Literal["text", "small"] = "text",
        curriculum: list[int] | None = None,
    ) -> None:
        super().__init__()
        if task not in ("mqar", "passkey"):
            raise MemLMError(f"unknown data.task {task!r}: use mqar or passkey")
        require_positive("data", seq_len=seq_len, batch_size=batch_size, num_train=num_train, num_val=num_val,
                         num_kv_pairs=num_kv_pairs, num_keys=num_keys, num_values=num_values, max_key=max_key,
                         stream_chunk=stream_chunk)
        for n in eval_lengths or []:
            require_positive("data", eval_lengths=n)
        lengths = [int(v) for v in (eval_lengths or [seq_len, 4 * seq_len])]
        if seq_len in lengths:
            lengths.remove(seq_len)
        self.eval_lengths = [int(seq_len)] + lengths
        if stream_chunk is not None:
            bad = [n for n in self.eval_lengths if n % stream_chunk]
            if stream_chunk < 1 or bad:
                raise MemLMError(f"data.stream_chunk ({stream_chunk}) must divide every length; {bad} do not")
        if filler not in ("text", "small"):
            raise MemLMError(f"unknown data.filler {filler!r}: use text or small")
        self.curriculum = [int(n) for n in (curriculum or [])]
        for n in self.curriculum:
            if n < 1 or n > seq_len or (stream_chunk and n % stream_chunk):
                raise MemLMError(f"data.curriculum length {n} must be in 1..seq_len ({seq_len})"
                                 + (f" and a multiple of stream_chunk ({stream_chunk})" if stream_chunk else ""))
        self.filler = filler
        self.task, self.seq_len = task, int(seq_len)
        self.num_kv_pairs, self.num_keys, self.num_values, self.max_key = num_kv_pairs, num_keys, num_values, max_key
        self.num_train, self.num_val, self.batch_size = num_train, num_val, batch_size
        self.stream_chunk, self.seed = stream_chunk, seed
        self.val_names = [f"len{n}" for n in self.eval_lengths]
        self.test_names = self.val_names
        self._tokenizer = self._build_tokenizer()
        self._val_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- tokenizer ----------------------------------------------------------------------
    def _build_tokenizer(self) -> TextTokenizer:
        if self.task == "passkey":
            alphabet = self.filler_text + PASSKEY_SENTENCE + PASSKEY_QUESTION + "0123456789"
            return build_tokenizer("char", [alphabet])
        vocab = {s: i for i, s in enumerate(SPECIALS)}
        for t in mqar_tokens(self.num_keys, self.num_values):
            vocab[t] = len(vocab)
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens(SPECIALS)
        return TextTokenizer(tok, kind="word")

    @property
    def filler_text(self) -> str:
        return SMALL_FILLER if self.filler == "small" else FILLER_TEXT

    def train_length(self, epoch: int) -> int:
        """The curriculum's training length for ``epoch`` (``seq_len`` once the curriculum is over)."""
        return self.curriculum[epoch] if epoch < len(self.curriculum) else self.seq_len

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    # -- data ---------------------------------------------------------------------------
    def make(self, rng: np.random.Generator, n: int, length: int, depths: np.ndarray | None = None):
        """``n`` sequences of ``length``: (input_ids, targets) int64 arrays."""
        if self.task == "mqar":
            offset = len(SPECIALS)
            return make_mqar(rng, n, length, self.num_kv_pairs, self.num_keys, self.num_values, offset)
        texts, starts, _ = passkey_texts(rng, n, length, self.max_key, depths, self.filler_text)
        ids = np.asarray(self._tokenizer.encode_batch(texts), dtype=np.int64)
        x, y = ids[:, :-1], np.full((n, length), IGNORE, dtype=np.int64)
        for i, s in enumerate(starts):
            y[i, s - 1 :] = ids[i, s:]
        return x, y

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._rank_world()
        n = max(1, self.num_train // world)

        def rows(epoch: int):
            return self.make(np.random.default_rng([self.seed, 1, epoch, rank]), n, self.train_length(epoch))

        return _RecallLoader(rows, n, self.train_length, self.batch_size, self.stream_chunk, self._epoch_fn())

    def _epoch_fn(self):
        return lambda: self.trainer.current_epoch if self.trainer is not None else 0

    def eval_set(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The fixed evaluation sequences of ``length`` (all ranks' rows)."""
        if length not in self._val_cache:
            self._val_cache[length] = self.make(np.random.default_rng([self.seed, 2, length]), self.num_val, length)
        return self._val_cache[length]

    def _eval_loaders(self):
        rank, world = self._rank_world()
        loaders = []
        for length in self.eval_lengths:
            x, y = self.eval_set(length)
            x, y = x[rank::world], y[rank::world]
            bs = max(1, self.batch_size * self.seq_len // length)
            loaders.append(_RecallLoader(lambda _e, x=x, y=y: (x, y), len(x), length, bs, self.stream_chunk, fixed=True))
        return loaders

    def val_dataloader(self):
        return self._eval_loaders()

    def test_dataloader(self):
        return self._eval_loaders()


__all__ = ["RecallDataModule", "make_mqar", "passkey_texts"]
