"""Token encoder and SDR classifier."""
import numpy as np
import pytest
import torch

from memlm.models.htm.classifier import SDRClassifier
from memlm.models.htm.encoder import TokenEncoder
from memlm.core.errors import MemLMError


def test_encoder_is_deterministic_sized_and_seeded():
    a = TokenEncoder(size=512, active_bits=21, seed=3)
    b = TokenEncoder(size=512, active_bits=21, seed=3)
    c = TokenEncoder(size=512, active_bits=21, seed=4)
    for t in range(20):
        x = a.encode(t)
        assert len(x) == 21 and len(set(x.tolist())) == 21 and x.min() >= 0 and x.max() < 512
        assert np.all(np.diff(x) > 0)
        np.testing.assert_array_equal(x, b.encode(t))
    assert any(not np.array_equal(a.encode(t), c.encode(t)) for t in range(20))
    table = a.table(20)
    assert table.shape == (20, 21)
    np.testing.assert_array_equal(table[7], a.encode(7))


def test_encoder_leaves_global_random_state_alone():
    np.random.seed(123)
    torch.manual_seed(123)
    np_state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state().clone()
    TokenEncoder(size=256, active_bits=10, seed=1, overlap=0.5).table(30, [f"w{i}" for i in range(30)])
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_distinct_tokens_barely_overlap_without_ngram_sharing():
    enc = TokenEncoder(size=1024, active_bits=20, seed=0)
    table = enc.table(50)
    overlaps = [len(np.intersect1d(table[i], table[j])) for i in range(50) for j in range(i + 1, 50)]
    assert max(overlaps) <= 5 and np.mean(overlaps) < 1.5


def test_related_words_share_bits_with_overlap():
    enc = TokenEncoder(size=1024, active_bits=30, seed=0, overlap=0.6, ngram=3)
    the, then, cat = enc.encode(0, "the"), enc.encode(1, "then"), enc.encode(2, "cat")
    assert len(np.intersect1d(the, then)) >= 8
    assert len(np.intersect1d(the, cat)) <= 3
    assert not np.array_equal(the, then)  # token-specific bits keep them apart
    assert len(the) == len(then) == 30


def test_encoder_rejects_bad_sizes():
    with pytest.raises(MemLMError):
        TokenEncoder(size=10, active_bits=20)


def test_classifier_learns_a_mapping_and_stays_normalised():
    clf = SDRClassifier(input_size=100, num_classes=5, alpha=1.0)
    patterns = {k: np.arange(k * 10, k * 10 + 8) for k in range(5)}
    for _ in range(30):
        for k, p in patterns.items():
            clf.learn(p, (k + 1) % 5)
    for k, p in patterns.items():
        prob = clf.infer(p)
        assert prob.sum() == pytest.approx(1.0, abs=1e-9)
        assert prob.argmax() == (k + 1) % 5 and prob.max() > 0.8


def test_classifier_predicts_before_learning_and_floors_probabilities():
    clf = SDRClassifier(input_size=20, num_classes=4, alpha=50.0, prob_floor=1e-4)
    bits = np.array([1, 2, 3], dtype=np.int32)
    nll, pred, _ = clf.run(np.tile(bits, 2), np.array([0, 3, 6]), np.array([2, 0]))
    assert nll[0] == pytest.approx(np.log(4.0), rel=1e-6)  # uniform before any learning
    assert np.isfinite(nll[1]) and nll[1] <= -np.log(1e-4 / (1 + 4e-4)) + 1e-9  # floored, finite
    assert pred[1] == 2


def test_classifier_state_round_trip():
    clf = SDRClassifier(30, 3, alpha=0.5)
    clf.learn([1, 2, 3], 2)
    other = SDRClassifier(30, 3, alpha=0.5)
    other.load_state_dict({k: torch.from_numpy(v) for k, v in clf.state_dict().items()})
    np.testing.assert_array_equal(other.weights, clf.weights)
    with pytest.raises(MemLMError):
        SDRClassifier(31, 3).load_state_dict(clf.state_dict())
