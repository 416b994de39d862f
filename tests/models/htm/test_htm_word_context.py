"""The word context (models/htm/context.py): which words a step's bits stand for, as a bag or by position."""
from __future__ import annotations

import numpy as np
import pytest

from memlm.core.errors import MemLMError
from memlm.models.htm.context import WordContext

TEXTS = [" ", "a", "b", "c", "d", "."]  # a character vocabulary: letters are word tokens, the rest end words


def encode(text: str) -> np.ndarray:
    return np.array([TEXTS.index(ch) for ch in text], dtype=np.int64)


def bits_after(ctx: WordContext, text: str) -> set[int]:
    flat, off, _ = ctx.run(encode(text), ctx.empty_state())
    return set(flat[off[-2]:off[-1]].tolist())


def make(positional: bool, words: int = 4) -> WordContext:
    ctx = WordContext(size=4096, bits_per_word=6, words=words, seed=1, positional=positional)
    ctx.set_token_texts(TEXTS)
    return ctx


def test_a_word_counts_once_it_is_complete():
    ctx = make(positional=False)
    assert bits_after(ctx, "ab") == set()  # "ab" is still being read
    assert len(bits_after(ctx, "ab ")) == 6  # the space completes it: one word's bits
    assert bits_after(ctx, "ab c") == bits_after(ctx, "ab ")  # "c" is not complete yet
    assert len(bits_after(ctx, "ab cd.")) == 12


def test_a_bag_forgets_the_order_and_positions_keep_it():
    bag, pos = make(positional=False), make(positional=True)
    assert bits_after(bag, "ab cd ") == bits_after(bag, "cd ab ")
    assert bits_after(pos, "ab cd ") != bits_after(pos, "cd ab ")
    # the fact-test case: the same last word ("is") after different words ("word", "paris"):
    # the two share exactly the last word's bits, and "cd" as the last word is not "cd" before it
    assert len(bits_after(pos, "ab cd ") & bits_after(pos, "ba cd ")) == 6
    assert bits_after(pos, "cd ").isdisjoint(bits_after(pos, "cd ab ") - bits_after(pos, "ab "))


def test_positional_bits_tell_inside_a_word_from_between_words():
    bag, pos = make(positional=False), make(positional=True)
    assert bits_after(bag, "ab c") == bits_after(bag, "ab ")
    assert bits_after(pos, "ab c").isdisjoint(bits_after(pos, "ab "))


def test_the_window_keeps_the_last_words_and_the_state_carries_over():
    ctx = make(positional=True, words=2)
    assert bits_after(ctx, "a b c d ") == bits_after(ctx, "c d ")  # only the last 2 words
    whole, off, end = ctx.run(encode("ab cd a"), ctx.empty_state())
    first, off1, mid = ctx.run(encode("ab c"), ctx.empty_state())
    rest, off2, end2 = ctx.run(encode("d a"), mid)
    np.testing.assert_array_equal(end, end2)
    assert set(whole[off[-2]:off[-1]].tolist()) == set(rest[off2[-2]:off2[-1]].tolist())


def test_bad_sizes_and_a_missing_token_table_are_errors():
    with pytest.raises(MemLMError, match="context_words: 0"):
        WordContext(size=0)
    with pytest.raises(MemLMError, match="set_tokenizer"):
        WordContext().run(np.array([1]), np.zeros(0, dtype=np.int64))
