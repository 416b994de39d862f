"""The spiking (LIF + STDP) mode: equal to its slow reference, spiking constraints hold, it
learns repeats like the rate mode, and it persists and resumes exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lif_reference import ReferenceLIF
from memlm.core.errors import MemLMError
from memlm.datamodules.conversation import builtin_items
from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig
from memlm.models.hebbian.lif import LIFColumnNetwork

NET = dict(cells_per_column=4, synapses_per_cell=6, learning_rate=0.3, hebbian_strength=1.0, depression=0.05,
           stdp_ltd=0.2, decay=0.01, w_max=1.0, threshold=0.2, k_winners=2, trace_len=2, trace_decay=0.5, seed=3)
LIF = dict(steps=6, tau_m=10.0, v_threshold=3.0, v_reset=0.0, refractory=1, input_current=1.0, recurrent_gain=2.0,
           tau_plus=5.0, tau_minus=4.0, theta_plus=0.2, theta_tau=300.0)


def _reference(n_units: int) -> ReferenceLIF:
    n = NET
    return ReferenceLIF(n_units, n["cells_per_column"], n["synapses_per_cell"], n["learning_rate"], n["hebbian_strength"],
                        n["depression"], n["stdp_ltd"], n["decay"], n["w_max"], n["threshold"], n["k_winners"],
                        n["trace_len"], n["trace_decay"], 0.5 * n["synapses_per_cell"] * n["w_max"], n["seed"],
                        LIF["steps"], LIF["tau_m"], LIF["v_threshold"], LIF["v_reset"], LIF["refractory"],
                        LIF["input_current"], LIF["recurrent_gain"], LIF["tau_plus"], LIF["tau_minus"],
                        LIF["theta_plus"], LIF["theta_tau"])


def test_fast_path_equals_the_slow_reference():
    rng = np.random.default_rng(0)
    n_units = 10
    fast, ref = LIFColumnNetwork(n_units, **LIF, **NET), _reference(n_units)
    # a few repeated sequences (so predictions, k-WTA in context and STDP all happen) and noise
    base = [[2, 4, 5, 6, 0], [2, 7, 5, 8, 0], [2, 4, 9, 3, 0]]
    stream = [base[i % 3] if rng.random() < 0.8 else [2] + rng.integers(3, n_units, 4).tolist() for i in range(40)]
    n_pred = 0
    for i, seq in enumerate(stream):
        learn = i % 7 != 6
        fast.reset()
        ref.reset()
        p_fast = fast.feed(seq, learn=learn)
        p_ref, spikes_ref = ref.feed(seq, learn=learn)
        assert p_fast.tolist() == p_ref.tolist(), i
        assert fast.last_spikes.tolist() == spikes_ref.tolist(), i
        n_pred += int((p_fast >= 0).sum())
    assert n_pred > 60  # the comparison covered predicted (in-context) windows, not only bursts
    assert np.array_equal(fast._targets[: fast.n_neurons], ref.targets)
    np.testing.assert_allclose(fast._weights[: fast.n_neurons], ref.weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.adaptive_thresholds().numpy(),
                               LIF["v_threshold"] + ref.theta_extra * np.exp(-(ref.clock - ref.theta_time) / LIF["theta_tau"]),
                               rtol=1e-9)


def test_spiking_constraints_hold():
    net = LIFColumnNetwork(10, **LIF, **NET)
    for _ in range(10):
        net.reset()
        net.feed([2, 4, 5, 6, 0])
        spikes = net.last_spikes
        assert ((spikes > 0).sum(1) <= NET["k_winners"]).all()  # k-WTA: at most k neurons of a column spike
        # refractory period: a neuron fires at most once every refractory + 1 steps
        assert spikes.max() <= -(-LIF["steps"] // (LIF["refractory"] + 1))
        assert (spikes.sum(1) > 0).all()
    # homeostasis: the neurons that fired carry a raised threshold, the others are at theta0
    thr = net.adaptive_thresholds().numpy()
    used = net.usage.numpy() > 0
    assert (thr[used] > LIF["v_threshold"]).all() and np.allclose(thr[~used], LIF["v_threshold"])
    # without learning: no weight, threshold or clock changes
    w, clock, thr0 = net.weights.clone(), net.clock, net.adaptive_thresholds().clone()
    net.reset()
    net.feed([2, 4, 5, 6, 0], learn=False)
    assert torch.equal(net.weights, w) and net.clock == clock and torch.equal(net.adaptive_thresholds(), thr0)


def _accuracy_by_exposure(neuron_model: str, exposures: int = 6) -> list[float]:
    sentences = builtin_items(30, seed=5)
    learner = ContinualLearner(LearnerConfig(neuron_model=neuron_model, neurons_per_column=8, synapses_per_neuron=16,
                                             calibrate_every=0, seed=0))
    accs = []
    for _ in range(exposures):
        correct = scored = 0
        for s in sentences:
            info = learner.learn_text(s)
            correct, scored = correct + info["correct"], scored + info["scored"]
        accs.append(correct / scored)
    return accs


def test_lif_learns_repeats_like_the_rate_mode():
    lif, rate = _accuracy_by_exposure("lif"), _accuracy_by_exposure("rate")
    # accuracy on repeats rises with exposures in both modes (figures: bench/hebbian_learning.py)
    assert lif[-1] > lif[0] + 0.2 and lif[-1] > 0.5 and lif[-1] > lif[1], lif
    assert rate[-1] > rate[0] + 0.2, rate


@pytest.mark.parametrize("neuron_model", ["rate", "lif"])
def test_both_modes_persist_and_resume_exactly(tmp_path, neuron_model):
    items = builtin_items(40, seed=7)
    cfg = LearnerConfig(neuron_model=neuron_model, neurons_per_column=8, synapses_per_neuron=16, seed=1)
    straight = ContinualLearner(cfg)
    for t in items:
        straight.learn_text(t)
    first = ContinualLearner(cfg)
    for t in items[:20]:
        first.learn_text(t)
    first.save(tmp_path / "s.pt")
    resumed = ContinualLearner.load(tmp_path / "s.pt")
    assert type(resumed.net) is type(straight.net)
    for t in items[20:]:
        resumed.learn_text(t)
    assert torch.equal(resumed.net.weights, straight.net.weights)
    assert torch.equal(resumed.net.targets, straight.net.targets)
    assert resumed.correct == straight.correct
    if neuron_model == "lif":
        assert resumed.net.clock == straight.net.clock > 0
        assert torch.equal(resumed.net.adaptive_thresholds(), straight.net.adaptive_thresholds())
    assert resumed.respond("the cat", temperature=0) == straight.respond("the cat", temperature=0)


def test_bad_neuron_model_and_settings_are_one_line_errors():
    with pytest.raises(MemLMError, match="neuron_model must be one of"):
        ContinualLearner(LearnerConfig(neuron_model="izhikevich"))
    with pytest.raises(MemLMError, match="invalid Hebbian network settings"):
        ContinualLearner(LearnerConfig(neuron_model="lif", lif_steps=0))
    rate = ContinualLearner(LearnerConfig(neurons_per_column=8, synapses_per_neuron=16))
    lif = ContinualLearner(LearnerConfig(neuron_model="lif", neurons_per_column=8, synapses_per_neuron=16))
    # a rate learner's network tensors under a LIF learner's config (a mismatched file)
    mixed = {k: v for k, v in lif.state_dict().items() if not k.startswith("net.")}
    mixed.update({k: v for k, v in rate.state_dict().items() if k.startswith("net.")})
    with pytest.raises(MemLMError, match="rate-mode network"):
        lif.load_state_dict(mixed)
