"""Kneser-Ney n-gram baseline: exact normalisation, the discount formula, error paths."""
import math

import numpy as np
import pytest

from memlm.core.errors import MemLMError
from memlm.models.ngram import KneserNeyNGram


def _all_next(model, prefix, vocab):
    """log p(w | prefix) for every w, by scoring prefix + [w]."""
    return np.array([model.log_probs(np.array(prefix + [w]), start=len(prefix))[0] for w in range(vocab)])


@pytest.mark.parametrize("prefix", [[0, 1, 2], [3, 3, 3], [], [4]])
def test_distribution_sums_to_one_seen_and_unseen_contexts(prefix):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, size=300)  # token 4 never occurs in training
    model = KneserNeyNGram(4, 5).fit(ids)
    assert math.isclose(np.exp(_all_next(model, prefix, 5)).sum(), 1.0, rel_tol=1e-9)


def test_bigram_matches_hand_computed_kneser_ney():
    # a b a b a c ; vocab 3 (a=0, b=1, c=2)
    ids = np.array([0, 1, 0, 1, 0, 2])
    model = KneserNeyNGram(2, 3).fit(ids)
    # bigram counts after a: b=2, c=1 -> n1=2 (ab? no: ab=2, ba=2, ac=1) n1=1, n2=2 -> D2 = 1/5
    d2 = 1 / (1 + 4)
    # unigram continuation counts: a (after b) 1, b (after a) 1, c (after a) 1 -> all 1: D1 = 1
    p1_b = (max(1 - 1.0, 0) / 3) + 1.0 * 3 / 3 * (1 / 3)
    expected = (2 - d2) / 3 + d2 * 2 / 3 * p1_b
    got = math.exp(model.log_probs(np.array([0, 1]), start=1)[0])
    assert math.isclose(got, expected, rel_tol=1e-12)


def test_higher_order_helps_on_repetitive_text():
    text = np.array(list(b"the cat sat on the mat. " * 40), dtype=np.int64)
    uni = KneserNeyNGram(1, 256).fit(text[:800])
    tri = KneserNeyNGram(3, 256).fit(text[:800])
    assert tri.bits_per_token(text[800:]) < 0.5 * uni.bits_per_token(text[800:])


def test_errors_are_one_line():
    with pytest.raises(MemLMError, match="order"):
        KneserNeyNGram(0, 10)
    with pytest.raises(MemLMError, match="62-bit"):
        KneserNeyNGram(20, 256)
    with pytest.raises(MemLMError, match="not fitted"):
        KneserNeyNGram(2, 10).log_probs([1, 2])
    with pytest.raises(MemLMError, match="outside"):
        KneserNeyNGram(2, 3).fit([0, 1, 2]).log_probs([0, 5])
