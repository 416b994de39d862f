"""The calibrated read-out behind val/loss and val/bpb: a normalised distribution whose
temperature is fitted on prequential training positions, not on the scored text."""
from __future__ import annotations

import math

import torch

from memlm.datamodules.conversation import builtin_items
from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig
from memlm.models.hebbian.readout import DEFAULT_EPS, DEFAULT_GAIN, EPS_GRID, GAIN_GRID, unit_probability

SMALL = dict(neurons_per_column=8, synapses_per_neuron=16, seed=0)


def _trained(items, **kw) -> ContinualLearner:
    learner = ContinualLearner(LearnerConfig(**{**SMALL, **kw}))
    for text in items:
        learner.learn_text(text)
    return learner


def test_calibration_scoring_does_not_change_learning():
    items = builtin_items(60, seed=3)
    with_cal, without = _trained(items, calibrate_every=2), _trained(items, calibrate_every=0)
    assert len(with_cal.readout) > 100 and len(without.readout) == 0
    assert torch.equal(with_cal.net.weights, without.net.weights)
    assert with_cal.correct == without.correct


def test_sparse_partition_function_matches_the_dense_softmax():
    learner = _trained(builtin_items(40, seed=1), calibrate_every=1)
    net = learner.net
    # recompute a few buffered positions densely: replay one text unit by unit
    cal = learner.readout
    g, e = GAIN_GRID[5:7], EPS_GRID[2:4]
    fast = cal.mean_nll(g, e)
    # dense reference from the stored rows: zeros for the live units without a stored score
    for gi, gain in enumerate(g.tolist()):
        for ei, eps in enumerate(e.tolist()):
            total = 0.0
            for vals, s_t, n_live in zip(cal.values, cal.target_score, cal.n_live):
                scores = torch.zeros(n_live, dtype=torch.float64)
                scores[: vals.numel()] = vals.double()
                if s_t == 0.0:
                    target = n_live - 1  # a zero-scored live unit
                else:
                    target = int(torch.nonzero(scores == torch.tensor(s_t, dtype=torch.float32).double())[0])
                alive = torch.ones(n_live, dtype=torch.bool)
                total -= math.log(unit_probability(scores, target, alive, 1.0, gain, eps))
            assert abs(total / len(cal) - float(fast[gi, ei])) < 1e-6 * max(1.0, total / len(cal))
    assert net.w_max == 1.0


def test_fitted_readout_beats_the_fixed_one_on_held_out_text():
    learner = _trained(builtin_items(300, seed=0))
    held_out = builtin_items(340, seed=0)[300:]

    def nll(gain_eps):
        learner.readout.gain, learner.readout.eps = gain_eps
        learner.readout.dirty = False
        r = [learner.score_text(t) for t in held_out]
        return sum(x["nll"] for x in r) / sum(x["scored"] for x in r)

    learner.readout.dirty = True
    fitted = learner.readout.fit()
    assert fitted != (DEFAULT_GAIN, DEFAULT_EPS)
    assert nll(fitted) < nll((DEFAULT_GAIN, DEFAULT_EPS))


def test_readout_persists_exactly(tmp_path):
    learner = _trained(builtin_items(80, seed=2))
    text = builtin_items(90, seed=2)[85]
    before = learner.score_text(text)
    assert learner.score_text(text) == before  # scoring leaves no trace (not even the tie-break counter)
    learner.save(tmp_path / "s.pt")
    again = ContinualLearner.load(tmp_path / "s.pt")
    assert (again.readout.gain, again.readout.eps) == (learner.readout.gain, learner.readout.eps)
    assert len(again.readout) == len(learner.readout)
    assert again.score_text(text) == before
