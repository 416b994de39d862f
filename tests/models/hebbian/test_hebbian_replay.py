"""Consolidation against re-segmentation: re-learning kept utterances when a merge creates a unit."""
from __future__ import annotations

import random

from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig

ANIMALS = ["cat", "dog", "bird", "fox", "horse", "mouse", "cow", "duck"]
PLACES = ["mat", "bed", "box", "rug", "chair", "log", "wall", "step"]


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"the {rng.choice(ANIMALS)} sat on the {rng.choice(PLACES)} {i % 7}." for i in range(n)]


def _retention(**kw) -> tuple[float, ContinualLearner]:
    learner = ContinualLearner(LearnerConfig(neurons_per_column=16, synapses_per_neuron=32, calibrate_every=0,
                                             seed=0, **kw))
    early, later = _sentences(20, 1), _sentences(200, 2)

    def acc():
        c = s = 0
        for t in early:
            a, b = learner.evaluate_text(t)
            c, s = c + a, s + b
        return c / s

    for _ in range(3):
        for t in early:
            learner.learn_text(t)
    before = acc()
    for t in later:
        learner.learn_text(t)
    return acc() / before, learner


def test_remapping_on_merges_keeps_more_of_the_early_sentences(tmp_path):
    plain, _ = _retention()
    remapped, learner = _retention(replay_memory=500, replay_per_merge=8)
    assert remapped > plain + 0.02, (plain, remapped)
    # counters count the user's utterances only, and the kept utterances persist
    assert learner.utterances == 260
    learner.save(tmp_path / "s.pt")
    again = ContinualLearner.load(tmp_path / "s.pt")
    assert list(again.replay) == list(learner.replay) and len(again.replay) == 260
