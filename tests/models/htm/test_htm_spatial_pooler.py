"""Spatial pooler rules (BAMI / htm.core): inhibition density, learning, duty cycles, boosting, bumping."""
import numpy as np
import pytest

from memlm.models.htm.spatial_pooler import SpatialPooler


def random_inputs(n, size=128, active=12, seed=0):
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(size, active, replace=False)).astype(np.int32) for _ in range(n)]


def test_global_inhibition_hits_target_density():
    sp = SpatialPooler(128, 200, density=0.05, seed=1)
    for x in random_inputs(30):
        cols = sp.compute(x, learn=True)
        assert len(cols) == 10
        assert np.all(np.diff(cols) > 0)
        ov = sp.overlaps(x)
        # the winners have the largest overlaps (boost is 1 with boost_strength 0)
        assert ov[cols].min() >= np.sort(ov)[-10] - 1e-9


def test_stimulus_threshold_blocks_weak_columns():
    x = random_inputs(1)[0]
    ov = SpatialPooler(128, 200, density=0.05, seed=1).overlaps(x)  # same seed: the same synapses
    assert len(SpatialPooler(128, 200, density=0.05, seed=1).compute(x, learn=False)) == 10  # no threshold: 5% win
    # just above the best overlap: not even the best column may win
    sp = SpatialPooler(128, 200, density=0.05, stimulus_threshold=float(ov.max()) + 1, seed=1)
    assert len(sp.compute(x, learn=False)) == 0
    # a threshold that fewer than 10 columns reach: exactly those win (overlap >= threshold),
    # the quota of 10 is not filled with weaker columns
    threshold = min(v for v in np.unique(ov) if 1 < (ov >= v).sum() < 10)
    sp = SpatialPooler(128, 200, density=0.05, stimulus_threshold=float(threshold), seed=1)
    np.testing.assert_array_equal(sp.compute(x, learn=False), np.flatnonzero(ov >= threshold))


def test_potential_pool_and_initial_connections():
    sp = SpatialPooler(100, 50, potential_pct=0.5, syn_perm_connected=0.1, seed=3)
    assert np.all(sp.potential.sum(1) == 50)
    assert np.all(sp.perm[sp.potential == 0] == 0)
    connected = (sp.perm >= 0.1) & (sp.potential == 1)
    assert 0.4 < connected.sum() / sp.potential.sum() < 0.6  # about half start connected


def test_learning_rule_on_winners_only():
    sp = SpatialPooler(64, 40, density=0.1, syn_perm_active_inc=0.05, syn_perm_inactive_dec=0.01, seed=2)
    x = random_inputs(1, size=64, active=10)[0]
    before = sp.perm.copy()
    cols = sp.compute(x, learn=True)
    after = sp.perm
    active_in = np.zeros(64, bool)
    active_in[x] = True
    for c in range(40):
        pot = sp.potential[c] == 1
        if c in cols:
            want = before[c].copy()
            want[pot & active_in] += 0.05
            want[pot & ~active_in] -= 0.01
            np.testing.assert_allclose(after[c], np.clip(want, 0, 1), atol=1e-6)
        else:
            np.testing.assert_array_equal(after[c], before[c])
    assert np.all(after[sp.potential == 0] == 0)


def test_duty_cycles_are_moving_averages_of_activity():
    sp = SpatialPooler(128, 100, density=0.05, seed=4)
    counts = np.zeros(100)
    xs = random_inputs(40, seed=5)
    for x in xs:
        counts[sp.compute(x, learn=True)] += 1
    # period = min(1000, iteration): with fewer than 1000 steps the duty cycle is the plain mean
    np.testing.assert_allclose(sp.active_duty, counts / len(xs), atol=1e-5)
    assert sp.active_duty.mean() == pytest.approx(0.05, abs=1e-6)
    assert np.all(sp.overlap_duty >= sp.active_duty - 1e-6)


def test_boost_factors_follow_duty_cycles_and_spread_activity():
    x = random_inputs(1, seed=7)[0]
    plain = SpatialPooler(128, 100, density=0.05, boost_strength=0.0, seed=4)
    boosted = SpatialPooler(128, 100, density=0.05, boost_strength=10.0, seed=4)
    used_plain, used_boost = set(), set()
    for _ in range(60):  # the same input again and again
        used_plain |= set(plain.compute(x, learn=True).tolist())
        used_boost |= set(boosted.compute(x, learn=True).tolist())
    np.testing.assert_allclose(boosted.boost, np.exp((0.05 - boosted.active_duty) * 10.0), rtol=1e-5)
    assert np.all(plain.boost == 1.0)
    assert len(used_plain) == 5  # no boosting: always the same winners
    assert len(used_boost) > 5  # boosting lets starved columns win
    assert boosted.boost[sorted(used_plain)].mean() < 1.0 < boosted.boost.max()


def test_weak_columns_are_bumped():
    sp = SpatialPooler(64, 30, density=0.1, syn_perm_connected=0.1, update_period=5, seed=6)
    sp.perm[0] = np.where(sp.potential[0] == 1, 0.0, 0.0).astype(np.float32)  # column 0 never overlaps
    sp.load_state_dict(sp.state_dict())  # rebuild the derived connected matrix
    xs = random_inputs(12, size=64, active=10, seed=1)
    for x in xs[:5]:
        sp.compute(x, learn=True)
    assert sp.min_overlap_duty[0] > 0  # first update round at iteration 5
    start = sp.perm[0].copy()
    for x in xs[5:]:
        sp.compute(x, learn=True)
    pot = sp.potential[0] == 1
    np.testing.assert_allclose(sp.perm[0][pot] - start[pot], 7 * 0.01, atol=1e-5)  # +connected/10 per step
    assert np.all(sp.perm[0][~pot] == 0)


def test_no_change_when_learning_is_off():
    sp = SpatialPooler(128, 100, density=0.05, boost_strength=2.0, seed=8)
    for x in random_inputs(20, seed=9):
        sp.compute(x, learn=True)
    before = sp.state_dict()
    outs = [sp.compute(x, learn=False) for x in random_inputs(20, seed=10)]
    again = [sp.compute(x, learn=False) for x in random_inputs(20, seed=10)]
    for k, v in sp.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    for a, b in zip(outs, again):
        np.testing.assert_array_equal(a, b)


def test_save_load_equality():
    sp = SpatialPooler(128, 100, density=0.05, boost_strength=2.0, seed=8)
    xs = random_inputs(30, seed=11)
    for x in xs[:15]:
        sp.compute(x, learn=True)
    other = SpatialPooler(128, 100, density=0.05, boost_strength=2.0, seed=99)
    other.load_state_dict(sp.state_dict())
    for x in xs[15:]:
        np.testing.assert_array_equal(sp.compute(x, learn=True), other.compute(x, learn=True))
    for k, v in sp.state_dict().items():
        np.testing.assert_array_equal(v, other.state_dict()[k], err_msg=k)
    np.testing.assert_array_equal(sp.conn_t, other.conn_t)
