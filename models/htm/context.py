"""Word context: a prompt-level context signal for the classifier (a union SDR of recent words).

The temporal memory carries context only while its predictions hold: a column that was not
predicted bursts, and from then on the state means "any context that ends in these
characters". A question never seen before therefore reaches the ``Assistant:`` tag of the
chat template with the same cells as any other question, and every reply is the same.

This module keeps, per stream, the hashes of the last ``words`` completed words and gives
each step the union of their SDRs (``bits_per_word`` bits each out of ``size``): a slow,
order-free summary of what was said, in the spirit of temporal pooling. The classifier
reads it next to the temporal memory's cells, so the next-token distribution depends on
the words of the prompt even where the temporal memory burst. With ``positional`` the bits of a word also depend on its slot (1 = the last completed
word, 2 = the one before, ...) and on whether the current token is inside a word, so the
signal says where each word was, not only which words were said: "word is " and "paris is "
then differ at the step after "is " (slot 2 holds "word" or "paris"), where a bag of words
gives both the same "is" bits and a classifier trained far more on one of them cannot tell
them apart. It is a hashed word-position feature, closer to a skip-gram than to HTM; the
temporal memory alone (``context_words: 0``) does not separate the two. Word boundaries come from
the token texts: a token whose text (without a leading space) is all letters or digits is
part of a word; any other token, or a token that starts with a space, ends the word.

Per-stream state (int64 [words + 1]): the running hash of the word being read (0 = none),
then the last ``words`` word hashes, newest first (0 = empty slot).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from memlm.core.errors import MemLMError

_MULT = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True)
def _mix(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def _word_bits(word, seed, per_word, size, mark, out_flat, pos):
    """Append the not yet marked bits of one word hash to out_flat[pos:]; returns the new end."""
    h = np.uint64(word) ^ seed
    for _ in range(per_word):
        h = _mix(h + _MULT)
        bit = np.int64(h % np.uint64(size))
        if mark[bit] == 0:
            mark[bit] = 1
            out_flat[pos] = bit
            pos += 1
    return pos


@njit(cache=True)
def _state_bits(state, seed, per_word, size, mark, out_flat):
    """The union of every word in a state, the one being read included."""
    pos = 0
    for k in range(state.shape[0]):
        if state[k] != 0:
            pos = _word_bits(state[k], seed, per_word, size, mark, out_flat, pos)
    for i in range(pos):
        mark[out_flat[i]] = 0
    return pos


@njit(cache=True)
def _context_run(tokens, in_word, starts_word, state, size, per_word, seed, positional, out_flat, out_off, mark):
    """Advance the word state over ``tokens``; step t's bits are those of the words completed by token t.

    ``positional``: a word's bits also depend on its slot (1 = the last completed word) and on
    whether token t is inside a word, so the bits say where the words were, not only which."""
    n_words = state.shape[0] - 1
    pos = 0
    out_off[0] = 0
    for t in range(tokens.shape[0]):
        tok = tokens[t]
        ends = (not in_word[tok]) or starts_word[tok]
        if ends and state[0] != 0:
            for k in range(n_words, 1, -1):
                state[k] = state[k - 1]
            state[1] = state[0]
            state[0] = 0
        if in_word[tok]:
            h = np.uint64(state[0]) * _MULT + np.uint64(tok + 1)
            h = _mix(h)
            state[0] = np.int64(h | np.uint64(1))  # never 0, which means "no word"
        for k in range(1, n_words + 1):
            if state[k] == 0:
                break
            w = state[k]
            if positional:
                w = np.int64(_mix(np.uint64(w) + np.uint64(k) * _MULT + np.uint64(2 if state[0] != 0 else 1)))
            pos = _word_bits(w, seed, per_word, size, mark, out_flat, pos)
        for i in range(out_off[t], pos):
            mark[out_flat[i]] = 0
        out_off[t + 1] = pos
    return pos


@njit(cache=True)
def merge_csr(a_flat, a_off, b_flat, b_off, b_shift, out_flat, out_off):
    """Row t of the result = row t of a, then row t of b with ``b_shift`` added."""
    pos = 0
    out_off[0] = 0
    for t in range(a_off.shape[0] - 1):
        for i in range(a_off[t], a_off[t + 1]):
            out_flat[pos] = a_flat[i]
            pos += 1
        for i in range(b_off[t], b_off[t + 1]):
            out_flat[pos] = b_flat[i] + b_shift
            pos += 1
        out_off[t + 1] = pos


class WordContext:
    """Union SDR of the last ``words`` words, ``bits_per_word`` of ``size`` bits per word
    (per (word, slot, inside-a-word) with ``positional``)."""

    def __init__(self, size: int = 2048, bits_per_word: int = 4, words: int = 16, seed: int = 42,
                 positional: bool = False):
        if size < 1 or bits_per_word < 1 or words < 1:
            raise MemLMError("word context needs size, bits_per_word and words >= 1; set context_words: 0 to turn it off")
        self.size, self.bits_per_word, self.words = int(size), int(bits_per_word), int(words)
        self.positional = bool(positional)
        self.seed = np.uint64((int(seed) * 0x2545F4914F6CDD1D + 0x1234567) % (1 << 64))
        self.in_word = np.zeros(0, dtype=np.bool_)
        self.starts_word = np.zeros(0, dtype=np.bool_)
        self._mark = np.zeros(self.size, dtype=np.uint8)

    def set_token_texts(self, texts: list[str]) -> None:
        """Which tokens are part of a word and which start one, from their decoded texts."""
        core = [t[1:] if t[:1] == " " else t for t in texts]
        self.in_word = np.array([bool(c) and c.isalnum() for c in core], dtype=np.bool_)
        self.starts_word = np.array([t[:1] == " " and len(t) > 1 for t in texts], dtype=np.bool_)

    def empty_state(self) -> np.ndarray:
        return np.zeros(self.words + 1, dtype=np.int64)

    def run(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bits_flat, bits_off[T+1], new_state) for the tokens read in order from ``state`` (not modified)."""
        if len(self.in_word) == 0:
            raise MemLMError("word context has no token table; the model needs its tokenizer (set_tokenizer)")
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        st = state.copy() if len(state) == self.words + 1 else self.empty_state()
        flat = np.empty(max(1, len(tokens) * self.words * self.bits_per_word), dtype=np.int32)
        off = np.zeros(len(tokens) + 1, dtype=np.int64)
        n = _context_run(tokens, self.in_word, self.starts_word, st, self.size, self.bits_per_word, self.seed,
                         self.positional, flat, off, self._mark)
        return flat[:n], off, st

    def state_bits(self, state: np.ndarray) -> np.ndarray:
        """The bits of every word of ``state``, the word being read included (for embeddings)."""
        out = np.empty(max(1, len(state) * self.bits_per_word), dtype=np.int32)
        n = _state_bits(np.ascontiguousarray(state, dtype=np.int64), self.seed, self.bits_per_word, self.size,
                        self._mark, out)
        return out[:n]
