"""Temporal memory rules, written from BAMI / htm.core's description (tiny sizes, fast)."""
import numpy as np
import pytest

from memlm.models.htm.temporal_memory import TemporalMemory

CPC = 4


def make_tm(**kw):
    args = dict(
        columns=32, cells_per_column=CPC, activation_threshold=3, min_threshold=2, initial_permanence=0.21,
        connected_permanence=0.5, max_new_synapse_count=3, permanence_increment=0.10, permanence_decrement=0.10,
        predicted_segment_decrement=0.0, max_segments_per_cell=255, max_synapses_per_segment=255, seed=7,
        initial_segment_capacity=4, initial_synapse_capacity=8,
    )
    args.update(kw)
    return TemporalMemory(**args)


def cells(col):
    return list(range(col * CPC, col * CPC + CPC))


def perms(tm, seg):
    return dict(tm.synapses_of(seg))


def test_predicted_cells_activate_and_become_winners():
    tm = make_tm()
    seg = tm.create_segment(5)  # column 1
    for c in cells(0):
        tm.create_synapse(seg, c, 0.5)
    tm.compute([0])
    assert list(tm.predictive_cells) == [5]
    active = tm.compute([1])
    assert list(active) == [5]
    assert list(tm.winner_cells) == [5]
    assert tm.anomaly == 0.0


def test_unpredicted_column_bursts_with_exactly_one_winner():
    tm = make_tm()
    active = tm.compute([0, 3])
    assert list(active) == cells(0) + cells(3)
    winners = tm.winner_cells
    assert len(winners) == 2
    assert sorted(w // CPC for w in winners) == [0, 3]
    assert tm.anomaly == 1.0


def test_active_segment_is_reinforced():
    tm = make_tm()
    seg = tm.create_segment(5)
    for c in (0, 1, 2):
        tm.create_synapse(seg, c, 0.5)
    tm.create_synapse(seg, 81, 0.5)  # column 20, not active
    tm.compute([0])
    tm.compute([1])
    p = perms(tm, seg)
    assert p[0] == pytest.approx(0.6) and p[1] == pytest.approx(0.6) and p[2] == pytest.approx(0.6)
    assert p[81] == pytest.approx(0.4)
    assert len(p) == 4  # 3 active potential synapses = max_new_synapse_count: nothing grows


def test_active_segment_grows_to_previous_winners():
    tm = make_tm(max_new_synapse_count=5)
    seg = tm.create_segment(5)
    for c in (0, 1, 2):
        tm.create_synapse(seg, c, 0.5)
    tm.compute([0, 7])  # winners: one cell of column 0 and one of column 7
    prev_winners = set(tm.winner_cells.tolist())
    tm.compute([1])
    p = perms(tm, seg)
    new = set(p) - {0, 1, 2}
    # grows max_new - active potential synapses (5 - 3 = 2) to winners not yet on the segment
    assert new <= prev_winners and len(new) == len(prev_winners - {0, 1, 2})
    for c in new:
        assert p[c] == pytest.approx(0.21)


def test_matching_segment_in_inactive_column_is_punished():
    tm = make_tm(predicted_segment_decrement=0.08)
    seg = tm.create_segment(9)  # column 2, stays inactive
    for c in (0, 1, 2):
        tm.create_synapse(seg, c, 0.5)
    tm.create_synapse(seg, 81, 0.5)
    tm.compute([0])
    tm.compute([1])
    p = perms(tm, seg)
    assert p[0] == pytest.approx(0.42) and p[1] == pytest.approx(0.42) and p[2] == pytest.approx(0.42)
    assert p[81] == pytest.approx(0.5)  # only synapses to previously active cells are punished


def test_no_punishment_without_predicted_segment_decrement():
    tm = make_tm(predicted_segment_decrement=0.0)
    seg = tm.create_segment(9)
    for c in (0, 1, 2):
        tm.create_synapse(seg, c, 0.5)
    tm.compute([0])
    tm.compute([1])
    assert all(v == pytest.approx(0.5) for v in perms(tm, seg).values())


def test_punished_to_zero_segment_is_destroyed():
    tm = make_tm(predicted_segment_decrement=0.3)
    seg = tm.create_segment(9)
    for c in (0, 1):
        tm.create_synapse(seg, c, 0.2)
    tm.compute([0])
    assert tm.num_segments == 1
    tm.compute([1])
    assert tm.segments_of(9) == [] and tm.num_segments == 1  # the only one left is column 1's new one
    assert all(tm.cell_of(g) // CPC == 1 for g in range(tm.counters[0]) if tm.cell_of(g) >= 0)


def test_bursting_column_learns_on_best_matching_segment():
    tm = make_tm()
    weak = tm.create_segment(5)
    tm.create_synapse(weak, 0, 0.3)
    tm.create_synapse(weak, 1, 0.3)
    best = tm.create_segment(6)
    for c in (0, 1, 2):
        tm.create_synapse(best, c, 0.3)  # not connected: matching, not active
    tm.compute([0])
    assert len(tm.predictive_cells) == 0
    tm.compute([1])
    assert list(tm.active_cells) == cells(1)  # bursts
    assert 6 in tm.winner_cells and 5 not in tm.winner_cells
    p = perms(tm, best)
    assert p[0] == pytest.approx(0.4) and p[1] == pytest.approx(0.4) and p[2] == pytest.approx(0.4)
    assert perms(tm, weak) == {0: pytest.approx(0.3), 1: pytest.approx(0.3)}


def test_new_segment_goes_to_least_used_cell():
    tm = make_tm()
    for cell in (4, 5, 7):  # column 1: cell 6 has the fewest segments
        g = tm.create_segment(cell)
        tm.create_synapse(g, 100, 0.5)  # to column 25, never active
    tm.compute([0])
    prev_winner = int(tm.winner_cells[0])
    tm.compute([1])
    assert 6 in tm.winner_cells
    segs = tm.segments_of(6)
    assert len(segs) == 1
    assert perms(tm, segs[0]) == {prev_winner: pytest.approx(0.21)}


def test_least_used_cell_tie_break_is_random():
    chosen = set()
    for seed in range(12):
        tm = make_tm(seed=seed)
        tm.compute([0])
        chosen.add(int(tm.winner_cells[0]))
    assert len(chosen) > 1 and chosen <= set(cells(0))


def test_growth_limited_by_max_new_synapse_count():
    tm = make_tm(max_new_synapse_count=3)
    tm.compute(list(range(10)))  # 10 previous winners
    prev = set(tm.winner_cells.tolist())
    tm.compute([20])
    winner = int(tm.winner_cells[0])
    (seg,) = tm.segments_of(winner)
    p = perms(tm, seg)
    assert len(p) == 3 and set(p) <= prev


def test_no_segment_grows_without_previous_winners():
    tm = make_tm()
    tm.compute([0])
    assert tm.num_segments == 0 and tm.num_synapses == 0


def test_weak_synapses_are_destroyed():
    tm = make_tm()
    seg = tm.create_segment(5)
    for c in (0, 1, 2):
        tm.create_synapse(seg, c, 0.5)
    tm.create_synapse(seg, 81, 0.05)  # inactive presynaptic cell, below the decrement
    n = tm.num_synapses
    tm.compute([0])
    tm.compute([1])
    assert 81 not in perms(tm, seg)
    assert tm.num_synapses == n - 1


def test_segment_limit_per_cell_evicts_least_recently_used():
    tm = make_tm(cells_per_column=1, max_segments_per_cell=2, columns=16)
    # three different contexts, each followed by column 15: its single cell gets a segment each time
    for ctx in (0, 1, 2):
        tm.reset()
        tm.compute([ctx])
        tm.compute([15])
    segs = tm.segments_of(15)
    assert len(segs) == 2
    presyn = sorted(next(iter(perms(tm, g))) for g in segs)
    assert presyn == [1, 2]  # the segment learned in context 0 (least recently used) is gone


def test_synapse_limit_per_segment():
    tm = make_tm(max_synapses_per_segment=4, max_new_synapse_count=3, min_threshold=1, activation_threshold=50)
    seg = tm.create_segment(5)
    for c in (100, 101, 102):
        tm.create_synapse(seg, c, 0.3)  # weak synapses to cells that never fire
    tm.create_synapse(seg, 0, 0.3)
    tm.compute(list(range(0, 1)) + [10, 11, 12])  # cell 0 active: the segment matches (1 >= min_threshold)
    tm.compute([1])
    p = perms(tm, seg)
    assert 5 in tm.winner_cells  # the matching segment's cell wins the burst
    # 4 synapses + 2 new (max_new 3 - 1 active) overrun the limit of 4 by 2: the two weakest
    # synapses not to previous winners go (100 and 101: ties broken by presynaptic cell)
    assert len(p) == 4
    assert p[0] == pytest.approx(0.4) and p[102] == pytest.approx(0.2)
    assert 100 not in p and 101 not in p


def test_anomaly_is_fraction_of_unpredicted_columns():
    tm = make_tm()
    seg = tm.create_segment(5)
    for c in cells(0)[:3]:
        tm.create_synapse(seg, c, 0.5)
    tm.compute([0])
    tm.compute([1, 2, 3, 4])
    assert tm.anomaly == pytest.approx(0.75)


def test_no_change_when_learning_is_off():
    tm = make_tm()
    rng = np.random.default_rng(0)
    seq = [np.sort(rng.choice(32, 4, replace=False)) for _ in range(12)]
    for _ in range(3):
        tm.reset()
        for cols in seq:
            tm.compute(cols, learn=True)
    before = tm.state_dict()
    tm.reset()
    for cols in seq + seq[::-1]:
        tm.compute(cols, learn=False)
    after = tm.state_dict()
    for k in before:
        if k.startswith("stream"):
            continue
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_save_load_equality_and_identical_continuation():
    tm = make_tm(predicted_segment_decrement=0.01)
    rng = np.random.default_rng(1)
    seqs = [[np.sort(rng.choice(32, 5, replace=False)) for _ in range(8)] for _ in range(3)]
    for _ in range(4):
        for s in seqs:
            tm.reset()
            for cols in s:
                tm.compute(cols)
    tm.compute(seqs[0][0])
    state = tm.state_dict()
    other = make_tm(predicted_segment_decrement=0.01)
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    for s in seqs:
        for cols in s:
            a = tm.compute(cols)
            b = other.compute(cols)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(tm.predictive_cells, other.predictive_cells)
    for k, v in tm.state_dict().items():
        np.testing.assert_array_equal(v, other.state_dict()[k], err_msg=k)


def test_defragment_keeps_behaviour():
    tm = make_tm()
    rng = np.random.default_rng(2)
    seq = [np.sort(rng.choice(32, 5, replace=False)) for _ in range(10)]
    for _ in range(3):
        tm.reset()
        for cols in seq:
            tm.compute(cols)
    twin = make_tm()
    twin.load_state_dict(tm.state_dict())
    twin.defragment()
    for cols in seq * 2:
        np.testing.assert_array_equal(tm.compute(cols), twin.compute(cols))
        np.testing.assert_array_equal(tm.predictive_cells, twin.predictive_cells)
    assert tm.num_synapses == twin.num_synapses and tm.num_segments == twin.num_segments


def test_run_matches_step_by_step_compute():
    rng = np.random.default_rng(3)
    seq = [np.sort(rng.choice(32, 4, replace=False)).astype(np.int32) for _ in range(15)]
    a, b = make_tm(), make_tm()
    steps = [a.compute(c) for c in seq]
    out = b.run(np.concatenate(seq), np.arange(16) * 4)
    for t, cells_t in enumerate(steps):
        np.testing.assert_array_equal(out.active_at(t), cells_t)
    np.testing.assert_array_equal(a.predictive_cells, b.predictive_cells)


def test_high_order_sequences_predict_from_first_element():
    """A-B-C-D-E vs F-B-C-D-G: after training, D predicts E or G depending on A or F."""
    n_per = 8
    letters = {ch: np.arange(i * n_per, (i + 1) * n_per, dtype=np.int32) for i, ch in enumerate("ABCDEFG")}
    tm = TemporalMemory(
        columns=64, cells_per_column=8, activation_threshold=5, min_threshold=4, max_new_synapse_count=8,
        initial_permanence=0.21, connected_permanence=0.5, permanence_increment=0.1, permanence_decrement=0.1,
        predicted_segment_decrement=0.05, seed=3,
    )
    # the context splits from the front one element per few repetitions (each new segment
    # needs 3 increments to connect); punishment retires the segments learned while bursting
    for _ in range(40):
        for seq in ("ABCDE", "FBCDG"):
            tm.reset()
            for ch in seq:
                tm.compute(letters[ch])
    for seq, want, other in (("ABCD", "E", "G"), ("FBCD", "G", "E")):
        tm.reset()
        for ch in seq:
            tm.compute(letters[ch], learn=False)
        pred = set(tm.predicted_columns().tolist())
        assert pred == set(letters[want].tolist()), (seq, pred)
        assert not pred & set(letters[other].tolist())
        assert tm.anomaly == 0.0  # D itself was predicted (by C in this context)


def test_defragmenting_inside_a_run_keeps_behaviour():
    """run() stops, re-sorts the synapses and resumes once enough were grown; the cells, the
    predictions and the learned segments equal those of a run that never defragments."""
    from memlm.models.htm.temporal_memory import C_SYN_AT_DEFRAG

    rng = np.random.default_rng(5)
    seq = [np.sort(rng.choice(32, 5, replace=False)).astype(np.int32) for _ in range(40)]
    flat, off = np.concatenate(seq * 3), np.arange(121, dtype=np.int64) * 5
    often, never = make_tm(), make_tm()
    often.defrag_min, often.defrag_ratio = 64, 1 << 30
    never.defrag_min = 1 << 40
    a, b = often.run(flat, off), never.run(flat, off)
    assert often.counters[C_SYN_AT_DEFRAG] > 0 and never.counters[C_SYN_AT_DEFRAG] == 0  # it did defragment mid-run
    np.testing.assert_array_equal(a.active, b.active)
    np.testing.assert_array_equal(a.winners, b.winners)
    np.testing.assert_array_equal(often.predictive_cells, never.predictive_cells)
    assert often.num_synapses == never.num_synapses and often.num_segments == never.num_segments
    for cell in range(often.num_cells):
        for g in often.segments_of(cell):
            assert often.synapses_of(g) == never.synapses_of(g)


def test_punishment_and_repeated_defragments_keep_behaviour():
    """Punishment (applied by walking the previous active cells' outgoing synapses) and
    defragment()'s two swapped synapse buffers, across capacity growth: a memory re-sorted
    every few steps ends with exactly the segments, permanences and cells of one never re-sorted."""
    from memlm.models.htm.temporal_memory import C_SYN_AT_DEFRAG

    rng = np.random.default_rng(6)
    seq = [np.sort(rng.choice(32, 5, replace=False)).astype(np.int32) for _ in range(40)]
    flat, off = np.concatenate(seq * 4), np.arange(161, dtype=np.int64) * 5
    often, never = make_tm(predicted_segment_decrement=0.055), make_tm(predicted_segment_decrement=0.055)
    often.defrag_min, often.defrag_ratio = 32, 1 << 30
    never.defrag_min = 1 << 40
    sorts = []
    for part in range(4):  # four calls: the spare buffer is reused, and reallocated after growth
        sl = slice(part * 200, (part + 1) * 200)
        o = off[:41]
        a, b = often.run(flat[sl], o), never.run(flat[sl], o)
        sorts.append(int(often.counters[C_SYN_AT_DEFRAG]))
        np.testing.assert_array_equal(a.active, b.active)
        np.testing.assert_array_equal(a.winners, b.winners)
        np.testing.assert_array_equal(a.anomaly, b.anomaly)
    assert len(set(sorts)) == 4 and never.counters[C_SYN_AT_DEFRAG] == 0  # it re-sorted during every call
    assert often.num_synapses == never.num_synapses and often.num_segments == never.num_segments
    punished = 0
    for cell in range(often.num_cells):
        assert often.segments_of(cell) == never.segments_of(cell)
        for g in often.segments_of(cell):
            syn = often.synapses_of(g)
            assert syn == never.synapses_of(g)
            punished += sum(abs(p * 100 - round(p * 100)) > 0.1 for _, p in syn)  # a 0.055 step leaves half hundredths
    assert punished > 0
    often.defragment()
    assert (often.syns[: often.counters[2], 0] >= 0).all()  # the live synapses are the first rows, no holes
    assert often.num_synapses == never.num_synapses == int(often.counters[2])
    np.testing.assert_array_equal(often.run(flat[:200], off[:41]).active, never.run(flat[:200], off[:41]).active)
