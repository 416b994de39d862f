"""The columnar network: local plasticity really changes weights, growth keeps them, bounds hold."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memlm.models.hebbian import network as netmod
from memlm.models.hebbian.network import NO_CONTEXT, ColumnNetwork

from hebbian_reference import ReferenceNetwork


def make(n_units=20, **kw):
    kw.setdefault("cells_per_column", 4)
    kw.setdefault("synapses_per_cell", 8)
    return ColumnNetwork(n_units, **kw)


def test_every_learning_step_changes_weights_and_no_learning_changes_nothing():
    net = make()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 20, size=6).tolist() for _ in range(5)] + [[3, 4, 5, 6]] * 30
    for seq in seqs:
        net.reset()
        net.feed([2], learn=True)
        for u in seq:
            before = net.weights.clone()
            net.feed([u], learn=True)
            assert not torch.equal(before, net.weights), "a learning step left every weight unchanged"
    frozen = net.weights.clone()
    t_frozen = net.targets.clone()
    steps = net.learning_steps
    for seq in seqs[:5]:
        net.reset()
        net.feed([2] + seq, learn=False)
    assert torch.equal(frozen, net.weights) and torch.equal(t_frozen, net.targets)
    assert net.learning_steps == steps


def test_weights_stay_bounded_under_heavy_repetition():
    net = make(w_max=1.0, synapses_per_cell=6)
    for _ in range(300):
        net.reset()
        net.feed([2, 5, 6, 7, 5, 6, 8, 9, 5], learn=True)
    w = net.weights
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    assert float(w.sum(1).max()) <= net.row_budget + 1e-4


def test_sequence_is_learned_and_predicted_in_context():
    net = make()
    seq = [2, 5, 6, 7, 8, 9]
    for _ in range(3):
        net.reset()
        net.feed(seq, learn=True)
    net.reset()
    preds = net.feed(seq, learn=False)
    assert preds[0] == NO_CONTEXT
    assert preds[1:].tolist() == seq[1:]


def test_high_order_context_uses_different_neurons_for_the_same_unit():
    # 5 6 7 -> 8   and   9 6 7 -> 10 : a first-order model cannot tell what follows 7
    net = make(cells_per_column=8, trace_len=1)
    a, b = [2, 5, 6, 7, 8], [2, 9, 6, 7, 10]
    for _ in range(4):
        for s in (a, b):
            net.reset()
            net.feed(s, learn=True)
    for s in (a, b):
        net.reset()
        net.feed(s[:-1], learn=False)
        assert net.predict() == s[-1]


def test_growth_keeps_learned_weights_and_predictions():
    net = make(n_units=12)
    for _ in range(3):
        net.reset()
        net.feed([2, 5, 6, 7, 8], learn=True)
    w_old, t_old, n_old = net.weights.clone(), net.targets.clone(), net.n_neurons
    net.grow(500)  # crosses the allocated capacity: arrays are re-allocated
    assert net.n_units == 500 and net.n_neurons == 500 * net.C
    assert torch.equal(net.weights[:n_old], w_old) and torch.equal(net.targets[:n_old], t_old)
    assert float(net.weights[n_old:].abs().sum()) == 0.0
    net.reset()
    assert net.feed([2, 5, 6, 7, 8], learn=False)[1:].tolist() == [5, 6, 7, 8]
    net.reset()
    net.feed([2, 5, 499, 300], learn=True)  # new columns learn too
    net.reset()
    assert net.feed([2, 5, 499, 300], learn=False)[-1] == 300


def test_retire_clears_synapses_in_and_out():
    net = make()
    for _ in range(3):
        net.reset()
        net.feed([2, 5, 6, 7], learn=True)
    net.retire([6])
    net.sweep_retired()
    C = net.C
    assert float(net.weights[6 * C : 7 * C].abs().sum()) == 0.0
    assert not bool(((net.targets // C) == 6).any())
    assert not bool(net.alive[6])
    net.reset()
    net.feed([2, 5], learn=False)
    assert net.predict() != 6


def test_kernel_matches_its_python_reference():
    if not netmod.HAVE_NUMBA:
        pytest.skip("numba is not installed: the kernel already runs as plain Python")
    rng = np.random.default_rng(1)
    seq = rng.integers(3, 15, size=120)
    seq[::7] = 2
    nets = [make(n_units=15, cells_per_column=4, synapses_per_cell=6, k_winners=2, trace_len=3) for _ in range(2)]
    preds = []
    for net, fn in zip(nets, (netmod._run, netmod._run.py_func)):
        p = np.empty(seq.size, dtype=np.int64)
        change = fn(
            seq.astype(np.int64), True, net._targets, net._weights, net._usage, net._alive, net._drive_0, net._touched_0, net._drive_c,
            net._touched_c, net._drive_g, net._touched_g, net._active, net._hist, net._hist_n, net._state,
            net.params, p,
        )
        preds.append(p)
        net.abs_change = change
    assert np.array_equal(preds[0], preds[1])
    assert np.array_equal(nets[0]._targets, nets[1]._targets)
    np.testing.assert_allclose(nets[0]._weights, nets[1]._weights, rtol=1e-5, atol=1e-6)
    assert nets[0].abs_change == pytest.approx(nets[1].abs_change, rel=1e-4)



@pytest.mark.parametrize("kw", [
    dict(k_winners=2, trace_len=3),
    dict(k_winners=1, trace_len=1),
    dict(k_winners=3, trace_len=3, depression=0.3, stdp_ltd=0.2, decay=0.05, synapses_per_cell=4),
], ids=["trace3", "first-order", "strong-depression"])
def test_fast_path_matches_an_independent_reference_of_the_rule(kw):
    """The network's fast path (numba when installed) against ``hebbian_reference``, a slow
    re-statement of the documented rule with no shared code: same predictions, synapse
    targets, usage, winners and active cells at every utterance; weights to float32 precision."""
    net = make(n_units=15, **kw)
    ref = ReferenceNetwork(15, net.C, net.S, net.lr, net.hebbian_strength, net.depression, net.stdp_ltd, net.decay,
                           net.w_max, net.threshold, net.k_winners, net.trace_len, net.trace_decay, net.row_budget,
                           net.seed)
    rng = np.random.default_rng(1)
    n = net.n_neurons
    for utt in range(40):
        # a recurring phrase (learned contexts, predictions, depression) among random utterances (bursts)
        seq = [2, 5, 6, 7, 8, 5, 6] if utt % 3 == 0 else [2] + rng.integers(3, 15, size=int(rng.integers(3, 9))).tolist()
        learn = utt % 5 != 4  # some utterances with learning off
        net.reset()
        ref.reset()
        assert net.feed(seq, learn).tolist() == ref.feed(seq, learn).tolist(), utt
        assert np.array_equal(net._targets[:n], ref.targets), utt
        np.testing.assert_allclose(net._weights[:n], ref.weights, rtol=1e-6, atol=1e-7, err_msg=str(utt))
        assert np.array_equal(net._usage[:n], ref.usage), utt
        assert net.winner_neurons() == ref.trace[0] and net.active_neurons() == ref.active, utt
        np.testing.assert_allclose(net.unit_scores().numpy(), ref.scores(), rtol=1e-6, atol=1e-7)
    assert net.learning_steps == ref.learning_steps > 150
    assert net.abs_change == pytest.approx(ref.abs_change, rel=1e-6)
    assert net.n_connected() > 0  # the run did learn transitions, so the comparison covered real updates

def test_state_tensors_round_trip_exactly():
    net = make()
    for _ in range(3):
        net.reset()
        net.feed([2, 5, 6, 7, 8, 5, 6], learn=True)
    net.feed([9], learn=True)  # mid-utterance context is part of the state
    other = make()
    other.load_state_tensors(net.state_tensors())
    assert torch.equal(other.weights, net.weights) and torch.equal(other.targets, net.targets)
    assert torch.equal(other.unit_scores(), net.unit_scores())
    a = net.feed([5, 6, 7, 3, 4], learn=True)
    b = other.feed([5, 6, 7, 3, 4], learn=True)
    assert np.array_equal(a, b) and torch.equal(other.weights, net.weights)
