"""Temporal memory (BAMI "Temporal Memory Algorithm", htm.core defaults), numba over flat arrays.

Data layout (all numpy; capacities grow by doubling; only the used prefix is saved):

segments  ``segs`` int64 [6, cap]: CELL (-1 = free), NSYN (live synapses), FIRST (head of the
          segment's synapse list), NEXT / PREV (the cell's segment list), LAST (iteration the
          segment was last active while learning; used for least-recently-used eviction)
          ``seg_counts`` int32 [cap, 2]: NAP / NAC, the number of active potential / active
          connected synapses; scratch, all zero between calls
synapses  ``syns`` int32 [cap, 8] (one 32-byte record per synapse): SEG (-1 = free), PRE
          (presynaptic cell), NSEG / PSEG (the segment's doubly linked synapse list), NPRE /
          PPRE (the presynaptic cell's doubly linked list of outgoing synapses), PERM (the
          float32 permanence, read through the float view ``perm``)
cells     ``cell_first_syn`` int32 [N] (head of the outgoing-synapse list), ``cell_first_seg``
          int32 [N], ``cell_nseg`` int32 [N]
free lists ``seg_free`` / ``syn_free`` int32 stacks; ``counters`` int64: segment high-water mark,
          free segments, synapse high-water mark, free synapses, iteration, live segments,
          live synapses; ``rng`` uint64 [1]: the state of a private xorshift64* generator.

Segment activation walks only the outgoing synapses of the active cells (presynaptic
index), so a step costs O(synapses of active cells), not O(all synapses).

One step (``compute``), for sorted active columns:

1. Columns with active segments (computed at the end of the previous step) were predicted:
   each cell with an active segment becomes active and a winner. Learning: the segment's
   synapses to previously active cells gain ``permanence_increment``, the others lose
   ``permanence_decrement``; then ``max_new_synapse_count - active potential synapses``
   new synapses grow to a random sample of previous winner cells not yet on the segment.
2. Other active columns burst: every cell becomes active. The winner is the cell of the
   best matching segment (most active potential synapses; it learns and grows as above),
   else the least-used cell (fewest segments, random tie-break), which gets a new segment
   with up to ``max_new_synapse_count`` synapses to previous winners.
3. Matching segments in columns that did not become active are punished by
   ``predicted_segment_decrement`` on their synapses to previously active cells.
4. Synapses whose permanence falls to 0 are destroyed, and so are segments left empty.
   A cell at ``max_segments_per_cell`` loses its least recently used segment before it
   grows a new one; a segment at ``max_synapses_per_segment`` loses its weakest synapses
   (not to previous winners) before growing.
5. Segments are activated by the new active cells: active = at least
   ``activation_threshold`` connected synapses (perm >= ``connected_permanence``) to active
   cells; matching = at least ``min_threshold`` synapses of any permanence. The cells with
   active segments are the predictive cells. Raw anomaly = fraction of active columns that
   had no predictive cell.

Inference option ``narrow_bursts_in_inference`` (learning off only, so no learning rule
changes): an unpredicted column that has a matching segment activates only that segment's
cell instead of bursting, so a context that is partly learned is narrowed, not replaced by
"every context ending in this input". Without a matching segment the column still bursts.

Every call starts by recomputing the segment activity of the stored previous active cells
(a pure function of the synapses), so the only per-stream state is (previous active cells,
previous winner cells): several independent streams can share one memory by swapping that
state (see :class:`StreamState`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from memlm.core.errors import MemLMError

EPS = 1e-5

# segment fields (segs int64 [6, cap])
S_CELL, S_NSYN, S_FIRST, S_NEXT, S_PREV, S_LAST = 0, 1, 2, 3, 4, 5
# synapse fields (syns int32 [6, cap])
Y_SEG, Y_PRE, Y_NSEG, Y_PSEG, Y_NPRE, Y_PPRE, Y_PERM = 0, 1, 2, 3, 4, 5, 6
Y_FIELDS = 8  # 32 bytes per synapse: one cache line holds everything a visit reads
# counters
C_SEG_HW, C_SEG_FREE, C_SYN_HW, C_SYN_FREE, C_ITER, C_NSEG, C_NSYN = 0, 1, 2, 3, 4, 5, 6
C_SYN_CREATED, C_SYN_AT_DEFRAG = 7, 8  # synapses ever created; that number at the last defragment()
# float params
P_CONNECTED, P_INITIAL, P_INC, P_DEC, P_PSD = 0, 1, 2, 3, 4
# int params
I_CPC, I_ACT, I_MIN, I_NEW, I_MAXSEG, I_MAXSYN, I_NARROW = 0, 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------------------------------
# random numbers: xorshift64*, state in a uint64 array (saved with the model)
@njit(cache=True)
def _rand_u64(rng):
    x = rng[0]
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    rng[0] = x
    return x * np.uint64(2685821657736338717)


@njit(cache=True)
def _rand_below(rng, n):
    return np.int64((_rand_u64(rng) >> np.uint64(11)) % np.uint64(n))


@njit(cache=True)
def _hash_below(seed, key, n):
    """A fixed pseudo-random number in [0, n) for (seed, key): splitmix64's finaliser.

    Inference breaks ties with this instead of the generator, so the choice depends only on
    the column, never on how many draws came before it in the same call: a context fed token
    by token and the same context fed at once pick the same winner cells."""
    x = seed ^ (np.uint64(key) * np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return np.int64((x >> np.uint64(11)) % np.uint64(n))


# ---------------------------------------------------------------------------------------
# connections: create / destroy
@njit(cache=True)
def _take_slot(free, counters, c_free, c_hw):
    """A slot (segment or synapse row): the last freed one if any, else the next never used (high-water mark)."""
    if counters[c_free] > 0:
        counters[c_free] -= 1
        return free[counters[c_free]]
    slot = counters[c_hw]
    counters[c_hw] += 1
    return slot


@njit(cache=True)
def _create_synapse(g, pre, p, segs, syns, perm, cell_first_syn, syn_free, counters):
    s = _take_slot(syn_free, counters, C_SYN_FREE, C_SYN_HW)
    syns[s, Y_SEG] = g
    syns[s, Y_PRE] = pre
    perm[s, Y_PERM] = p
    head = segs[S_FIRST, g]
    syns[s, Y_NSEG] = head
    syns[s, Y_PSEG] = -1
    if head != -1:
        syns[head, Y_PSEG] = s
    segs[S_FIRST, g] = s
    head = cell_first_syn[pre]
    syns[s, Y_NPRE] = head
    syns[s, Y_PPRE] = -1
    if head != -1:
        syns[head, Y_PPRE] = s
    cell_first_syn[pre] = s
    segs[S_NSYN, g] += 1
    counters[C_NSYN] += 1
    counters[C_SYN_CREATED] += 1


@njit(cache=True)
def _destroy_synapse(s, segs, syns, cell_first_syn, syn_free, counters):
    g = syns[s, Y_SEG]
    nx = syns[s, Y_NSEG]
    pv = syns[s, Y_PSEG]
    if pv != -1:
        syns[pv, Y_NSEG] = nx
    else:
        segs[S_FIRST, g] = nx
    if nx != -1:
        syns[nx, Y_PSEG] = pv
    nx = syns[s, Y_NPRE]
    pv = syns[s, Y_PPRE]
    if pv != -1:
        syns[pv, Y_NPRE] = nx
    else:
        cell_first_syn[syns[s, Y_PRE]] = nx
    if nx != -1:
        syns[nx, Y_PPRE] = pv
    syns[s, Y_SEG] = -1
    segs[S_NSYN, g] -= 1
    syn_free[counters[C_SYN_FREE]] = s
    counters[C_SYN_FREE] += 1
    counters[C_NSYN] -= 1


@njit(cache=True)
def _destroy_segment(g, segs, syns, cell_first_syn, cell_first_seg, cell_nseg, seg_free, syn_free, counters):
    s = segs[S_FIRST, g]
    while s != -1:
        nx = syns[s, Y_NSEG]
        _destroy_synapse(s, segs, syns, cell_first_syn, syn_free, counters)
        s = nx
    cell = segs[S_CELL, g]
    nx = segs[S_NEXT, g]
    pv = segs[S_PREV, g]
    if pv != -1:
        segs[S_NEXT, pv] = nx
    else:
        cell_first_seg[cell] = nx
    if nx != -1:
        segs[S_PREV, nx] = pv
    cell_nseg[cell] -= 1
    segs[S_CELL, g] = -1
    seg_free[counters[C_SEG_FREE]] = g
    counters[C_SEG_FREE] += 1
    counters[C_NSEG] -= 1


@njit(cache=True)
def _create_segment(cell, max_seg, segs, syns, cell_first_syn, cell_first_seg, cell_nseg, seg_free, syn_free, counters):
    while cell_nseg[cell] >= max_seg:  # evict the least recently used segment of the cell
        best = -1
        g = cell_first_seg[cell]
        while g != -1:
            if best == -1 or segs[S_LAST, g] < segs[S_LAST, best]:
                best = g
            g = segs[S_NEXT, g]
        _destroy_segment(best, segs, syns, cell_first_syn, cell_first_seg, cell_nseg, seg_free, syn_free, counters)
    g = _take_slot(seg_free, counters, C_SEG_FREE, C_SEG_HW)
    segs[S_CELL, g] = cell
    segs[S_NSYN, g] = 0
    segs[S_FIRST, g] = -1
    segs[S_LAST, g] = counters[C_ITER]
    head = cell_first_seg[cell]
    segs[S_NEXT, g] = head
    segs[S_PREV, g] = -1
    if head != -1:
        segs[S_PREV, head] = g
    cell_first_seg[cell] = g
    cell_nseg[cell] += 1
    counters[C_NSEG] += 1
    return g


# ---------------------------------------------------------------------------------------
# learning rules
@njit(cache=True)
def _adapt_segment(g, prev_active_mark, inc, dec, segs, syns, perm, cell_first_syn, cell_first_seg, cell_nseg,
                   seg_free, syn_free, counters):
    """+inc on synapses from previously active cells, -dec on the others; destroy at 0.
    Returns False when the segment was destroyed (no synapses left)."""
    s = segs[S_FIRST, g]
    while s != -1:
        nx = syns[s, Y_NSEG]
        if prev_active_mark[syns[s, Y_PRE]]:
            p = perm[s, Y_PERM] + inc
        else:
            p = perm[s, Y_PERM] - dec
        if p > 1.0:
            p = 1.0
        if p < EPS:
            _destroy_synapse(s, segs, syns, cell_first_syn, syn_free, counters)
        else:
            perm[s, Y_PERM] = p
        s = nx
    if segs[S_NSYN, g] == 0:
        _destroy_segment(g, segs, syns, cell_first_syn, cell_first_seg, cell_nseg, seg_free, syn_free, counters)
        return False
    return True


@njit(cache=True)
def _grow_synapses(g, winners, n_winners, n_desired, scratch, cand, initial, max_syn, segs, syns, perm,
                   cell_first_syn, syn_free, counters, rng):
    """Grow up to n_desired synapses from g to a random sample of winners not yet on g."""
    s = segs[S_FIRST, g]
    while s != -1:
        scratch[syns[s, Y_PRE]] = 1
        s = syns[s, Y_NSEG]
    n_cand = 0
    for i in range(n_winners):
        w = winners[i]
        if scratch[w] == 0:
            cand[n_cand] = w
            n_cand += 1
    s = segs[S_FIRST, g]
    while s != -1:
        scratch[syns[s, Y_PRE]] = 0
        s = syns[s, Y_NSEG]
    n_actual = min(n_desired, n_cand)
    if n_actual <= 0:
        return
    overrun = segs[S_NSYN, g] + n_actual - max_syn
    if overrun > 0:  # make room: destroy the weakest synapses not to previous winners
        for i in range(n_winners):
            scratch[winners[i]] = 1
        for _ in range(overrun):
            weakest = -1
            s = segs[S_FIRST, g]
            while s != -1:
                if scratch[syns[s, Y_PRE]] == 0:
                    if (weakest == -1 or perm[s, Y_PERM] < perm[weakest, Y_PERM]
                            or (perm[s, Y_PERM] == perm[weakest, Y_PERM] and syns[s, Y_PRE] < syns[weakest, Y_PRE])):
                        weakest = s
                s = syns[s, Y_NSEG]
            if weakest == -1:
                break
            _destroy_synapse(weakest, segs, syns, cell_first_syn, syn_free, counters)
        for i in range(n_winners):
            scratch[winners[i]] = 0
        n_actual = min(n_actual, max_syn - segs[S_NSYN, g])
    for i in range(n_actual):  # partial Fisher-Yates sample
        j = i + _rand_below(rng, n_cand - i)
        tmp = cand[i]
        cand[i] = cand[j]
        cand[j] = tmp
        _create_synapse(g, cand[i], initial, segs, syns, perm, cell_first_syn, syn_free, counters)


# ---------------------------------------------------------------------------------------
# segment activation
@njit(cache=True)
def _activate(active, n_active, learn, segs, seg_counts, syns, perm, cell_first_syn, counters, fparams, iparams,
              touched, n_touched_prev, act_segs, match_segs):
    """Count active synapses per segment for the given active cells.

    Clears the previous counts (the ``n_touched_prev`` first entries of ``touched``), fills
    ``act_segs`` / ``match_segs`` sorted by (cell, segment) and returns
    (n_touched, n_act, n_match)."""
    for i in range(n_touched_prev):
        g = touched[i]
        seg_counts[g, 0] = 0
        seg_counts[g, 1] = 0
    thr = np.float32(fparams[P_CONNECTED] - EPS)
    nt = 0
    for i in range(n_active):
        s = cell_first_syn[active[i]]
        while s != -1:
            g = syns[s, Y_SEG]
            if seg_counts[g, 0] == 0:
                touched[nt] = g
                nt += 1
            seg_counts[g, 0] += 1
            if perm[s, Y_PERM] >= thr:
                seg_counts[g, 1] += 1
            s = syns[s, Y_NPRE]
    act_thr = iparams[I_ACT]
    min_thr = iparams[I_MIN]
    na = 0
    nm = 0
    for i in range(nt):
        g = touched[i]
        key = (segs[S_CELL, g] << 32) | g
        if seg_counts[g, 1] >= act_thr:
            act_segs[na] = key
            na += 1
            if learn:
                segs[S_LAST, g] = counters[C_ITER]
        if seg_counts[g, 0] >= min_thr:
            match_segs[nm] = key
            nm += 1
    act_segs[:na].sort()  # in place: no allocation per step
    match_segs[:nm].sort()  # in place: no allocation per step
    low = np.int64(0xFFFFFFFF)
    for i in range(na):
        act_segs[i] = act_segs[i] & low
    for i in range(nm):
        match_segs[i] = match_segs[i] & low
    return nt, na, nm


# ---------------------------------------------------------------------------------------
# the whole sequence
@njit(cache=True)
def _tm_run(
    cols_flat, cols_off, learn, n_columns, fparams, iparams,
    segs, seg_counts, syns, perm, cell_first_syn, cell_first_seg, cell_nseg, seg_free, syn_free, counters, rng,
    prev_active, prev_winners, n_prev,  # in/out: n_prev = [n_active, n_winners]
    out_active, out_active_off, out_winners, out_winners_off, out_anomaly, out_predictive, n_pred,
    seg_reserve, syn_reserve, defrag_at,
):
    """Run compute() over T steps. Stops early (returns the steps done) when the free
    capacity drops under the reserve one step may need, or when learning has created
    ``defrag_at`` synapses in all (the presynaptic lists are then scattered over memory and
    every visit is a cache miss); the caller grows or defragments and resumes."""
    cpc = iparams[I_CPC]
    narrow = (not learn) and iparams[I_NARROW] != 0
    max_new = iparams[I_NEW]
    max_seg = iparams[I_MAXSEG]
    max_syn = iparams[I_MAXSYN]
    initial = np.float32(fparams[P_INITIAL])
    inc = np.float32(fparams[P_INC])
    dec = np.float32(fparams[P_DEC])
    psd = np.float32(fparams[P_PSD])
    n_cells = n_columns * cpc
    seg_cap = segs.shape[1]
    syn_cap = syns.shape[0]

    prev_mark = np.zeros(n_cells, dtype=np.uint8)
    scratch = np.zeros(n_cells, dtype=np.uint8)
    cand = np.empty(n_cells, dtype=np.int32)
    col_state = np.zeros(n_columns, dtype=np.uint8)  # 1 active, 2 active and predicted
    col_match_start = np.full(n_columns, -1, dtype=np.int64)
    col_match_end = np.zeros(n_columns, dtype=np.int64)
    touched = np.empty(seg_cap, dtype=np.int64)
    act_segs = np.empty(seg_cap, dtype=np.int64)
    match_segs = np.empty(seg_cap, dtype=np.int64)
    match_col = np.empty(seg_cap, dtype=np.int64)
    pun_mark = np.zeros(seg_cap, dtype=np.uint8)  # segments punished this step
    pun_segs = np.empty(seg_cap, dtype=np.int64)
    npsd = -psd
    new_active = np.empty(n_cells, dtype=np.int32)
    new_winners = np.empty(n_cells, dtype=np.int32)  # a predicted column can have several winners

    n_pa = n_prev[0]
    n_pw = n_prev[1]
    for i in range(n_pa):
        prev_mark[prev_active[i]] = 1
    nt, na, nm = _activate(prev_active, n_pa, False, segs, seg_counts, syns, perm, cell_first_syn, counters,
                           fparams, iparams, touched, 0, act_segs, match_segs)
    n_steps = len(cols_off) - 1
    pos_a = out_active_off[0]
    pos_w = out_winners_off[0]
    done = 0
    for t in range(n_steps):
        c0 = cols_off[t]
        c1 = cols_off[t + 1]
        n_cols_active = c1 - c0
        if learn:
            if counters[C_SYN_CREATED] >= defrag_at:
                break
            free_seg = seg_cap - counters[C_SEG_HW] + counters[C_SEG_FREE]
            free_syn = syn_cap - counters[C_SYN_HW] + counters[C_SYN_FREE]
            if free_seg < n_cols_active + 1 or free_syn < (na + n_cols_active) * max_new + 1:
                seg_reserve[0] = n_cols_active + 1
                syn_reserve[0] = (na + n_cols_active) * max_new + 1
                break
        for i in range(c0, c1):
            col_state[cols_flat[i]] = 1
        for i in range(nm):
            col = segs[S_CELL, match_segs[i]] // cpc
            match_col[i] = col
            if col_match_start[col] == -1:
                col_match_start[col] = i
            col_match_end[col] = i + 1
        n_new = 0
        n_win = 0
        # 1. predicted columns: cells with active segments become active and winners
        last_cell = -1
        for i in range(na):
            g = act_segs[i]
            cell = segs[S_CELL, g]
            col = cell // cpc
            if col_state[col] == 0:
                continue
            col_state[col] = 2
            if cell != last_cell:
                new_active[n_new] = cell
                n_new += 1
                new_winners[n_win] = cell
                n_win += 1
                last_cell = cell
            if learn:
                n_grow = max_new - seg_counts[g, 0]
                alive = _adapt_segment(g, prev_mark, inc, dec, segs, syns, perm, cell_first_syn, cell_first_seg,
                                       cell_nseg, seg_free, syn_free, counters)
                if alive and n_grow > 0:
                    _grow_synapses(g, prev_winners, n_pw, n_grow, scratch, cand, initial, max_syn, segs, syns,
                                   perm, cell_first_syn, syn_free, counters, rng)
        # 2. bursting columns
        n_burst = 0
        for i in range(c0, c1):
            col = cols_flat[i]
            if col_state[col] == 2:
                continue
            n_burst += 1
            best = -1
            if col_match_start[col] != -1:
                for j in range(col_match_start[col], col_match_end[col]):
                    g = match_segs[j]
                    if best == -1 or seg_counts[g, 0] > seg_counts[best, 0]:
                        best = g
            if narrow and best != -1:  # inference: the matching cell keeps the context, no burst
                new_active[n_new] = segs[S_CELL, best]
                n_new += 1
            else:
                for k in range(cpc):
                    new_active[n_new] = col * cpc + k
                    n_new += 1
            if best != -1:
                winner = segs[S_CELL, best]
                if learn:
                    n_grow = max_new - seg_counts[best, 0]
                    alive = _adapt_segment(best, prev_mark, inc, dec, segs, syns, perm, cell_first_syn,
                                           cell_first_seg, cell_nseg, seg_free, syn_free, counters)
                    if alive and n_grow > 0:
                        _grow_synapses(best, prev_winners, n_pw, n_grow, scratch, cand, initial, max_syn, segs,
                                       syns, perm, cell_first_syn, syn_free, counters, rng)
            else:
                fewest = cell_nseg[col * cpc]
                for k in range(1, cpc):
                    fewest = min(fewest, cell_nseg[col * cpc + k])
                n_ties = 0
                for k in range(cpc):
                    if cell_nseg[col * cpc + k] == fewest:
                        n_ties += 1
                pick = _rand_below(rng, n_ties) if learn else _hash_below(rng[0], col, n_ties)
                winner = -1
                for k in range(cpc):
                    if cell_nseg[col * cpc + k] == fewest:
                        if pick == 0:
                            winner = col * cpc + k
                            break
                        pick -= 1
                if learn:
                    n_grow = min(max_new, n_pw)
                    if n_grow > 0:
                        g = _create_segment(winner, max_seg, segs, syns, cell_first_syn, cell_first_seg, cell_nseg,
                                            seg_free, syn_free, counters)
                        _grow_synapses(g, prev_winners, n_pw, n_grow, scratch, cand, initial, max_syn, segs,
                                       syns, perm, cell_first_syn, syn_free, counters, rng)
            new_winners[n_win] = winner
            n_win += 1
        # 3. punish matching segments in columns that did not become active: -psd on their
        # synapses to previously active cells. The synapses are found by walking the previous
        # active cells' outgoing lists (contiguous after defragment(), so read sequentially),
        # not each segment's own list (one cache miss per synapse: ~480 segments x 28
        # synapses a step on text). Same updates; empty segments are destroyed afterwards in
        # the order of the matching list, as a per-segment walk would.
        if learn and psd > 0.0:
            n_pun = 0
            for i in range(nm):
                g = match_segs[i]
                if segs[S_CELL, g] < 0:
                    continue
                if col_state[match_col[i]] == 0:
                    pun_mark[g] = 1
                    pun_segs[n_pun] = g
                    n_pun += 1
            if n_pun > 0:
                for i in range(n_pa):
                    s = cell_first_syn[prev_active[i]]
                    while s != -1:
                        nx = syns[s, Y_NPRE]
                        if pun_mark[syns[s, Y_SEG]]:
                            p = perm[s, Y_PERM] + npsd
                            if p > 1.0:
                                p = 1.0
                            if p < EPS:
                                _destroy_synapse(s, segs, syns, cell_first_syn, syn_free, counters)
                            else:
                                perm[s, Y_PERM] = p
                        s = nx
                for i in range(n_pun):
                    g = pun_segs[i]
                    pun_mark[g] = 0
                    if segs[S_NSYN, g] == 0:
                        _destroy_segment(g, segs, syns, cell_first_syn, cell_first_seg, cell_nseg, seg_free,
                                         syn_free, counters)
        for i in range(nm):
            col_match_start[match_col[i]] = -1
        for i in range(c0, c1):
            col_state[cols_flat[i]] = 0
        out_anomaly[t] = n_burst / n_cols_active if n_cols_active > 0 else 0.0
        # 4. the new state becomes the previous state
        for i in range(n_pa):
            prev_mark[prev_active[i]] = 0
        new_active[:n_new].sort()  # in place: no allocation per step
        new_winners[:n_win].sort()  # in place: no allocation per step
        for i in range(n_new):
            prev_active[i] = new_active[i]
            prev_mark[new_active[i]] = 1
            out_active[pos_a + i] = new_active[i]
        for i in range(n_win):
            prev_winners[i] = new_winners[i]
            out_winners[pos_w + i] = new_winners[i]
        n_pa = n_new
        n_pw = n_win
        pos_a += n_new
        pos_w += n_win
        out_active_off[t + 1] = pos_a
        out_winners_off[t + 1] = pos_w
        if learn:
            counters[C_ITER] += 1
        # 5. activate segments for the next step
        nt, na, nm = _activate(prev_active, n_pa, learn, segs, seg_counts, syns, perm, cell_first_syn, counters,
                               fparams, iparams, touched, nt, act_segs, match_segs)
        done = t + 1
    # predictive cells for the next step, then leave the scratch counts at zero
    npred = 0
    last = -1
    for i in range(na):
        cell = segs[S_CELL, act_segs[i]]
        if cell != last:
            out_predictive[npred] = cell
            npred += 1
            last = cell
    n_pred[0] = npred
    for i in range(nt):
        seg_counts[touched[i], 0] = 0
        seg_counts[touched[i], 1] = 0
    n_prev[0] = n_pa
    n_prev[1] = n_pw
    return done


@njit(cache=True)
def _defragment(syns, rec, new_id, segs, cell_first_syn, counters):
    """Counting sort of the live synapses by presynaptic cell (stable in id order) from ``syns``
    into ``rec`` (same shape; the caller swaps the two: no copy back, no allocation of the
    synapse-sized arrays), with all links rewritten. ``new_id``: int32 scratch of at least the
    high-water mark. Returns the number of live synapses (the new high-water mark)."""
    hw = counters[C_SYN_HW]
    n_cells = cell_first_syn.shape[0]
    start = np.zeros(n_cells + 1, dtype=np.int64)
    for s in range(hw):
        if syns[s, Y_SEG] >= 0:
            start[syns[s, Y_PRE] + 1] += 1
    for c in range(n_cells):
        start[c + 1] += start[c]
    n = start[n_cells]
    new_id[:hw] = -1
    fill = start[:n_cells].copy()
    for s in range(hw):
        if syns[s, Y_SEG] >= 0:
            pre = syns[s, Y_PRE]
            new_id[s] = fill[pre]
            fill[pre] += 1
    for s in range(hw):
        k = new_id[s]
        if k >= 0:
            rec[k] = syns[s]
            nx = syns[s, Y_NSEG]
            rec[k, Y_NSEG] = new_id[nx] if nx >= 0 else -1
            pv = syns[s, Y_PSEG]
            rec[k, Y_PSEG] = new_id[pv] if pv >= 0 else -1
    for c in range(n_cells):
        a = start[c]
        b = start[c + 1]
        cell_first_syn[c] = a if b > a else -1
        for k in range(a, b):
            rec[k, Y_NPRE] = k + 1 if k + 1 < b else -1
            rec[k, Y_PPRE] = k - 1 if k > a else -1
    for g in range(counters[C_SEG_HW]):
        if segs[S_CELL, g] >= 0 and segs[S_FIRST, g] >= 0:
            segs[S_FIRST, g] = new_id[segs[S_FIRST, g]]
    counters[C_SYN_HW] = n
    counters[C_SYN_FREE] = 0
    counters[C_SYN_AT_DEFRAG] = counters[C_SYN_CREATED]
    return n


@dataclass
class StreamState:
    """The per-stream part of the temporal memory: previous active and winner cells.

    ``context`` is carried along untouched for the layers above (the language model keeps its
    word-context state there, so one object is the whole per-stream state); reset clears it."""

    active: np.ndarray
    winners: np.ndarray
    context: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def empty(cls) -> "StreamState":
        return cls(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32))

    def copy(self) -> "StreamState":
        return StreamState(self.active.copy(), self.winners.copy(), self.context.copy())


@dataclass
class TMOutput:
    """Per-step results of :meth:`TemporalMemory.run` (CSR: flat values + offsets[T+1])."""

    active: np.ndarray
    active_off: np.ndarray
    winners: np.ndarray
    winners_off: np.ndarray
    anomaly: np.ndarray

    def active_at(self, t: int) -> np.ndarray:
        return self.active[self.active_off[t] : self.active_off[t + 1]]

    def winners_at(self, t: int) -> np.ndarray:
        return self.winners[self.winners_off[t] : self.winners_off[t + 1]]


class TemporalMemory:
    """Temporal memory over ``columns`` x ``cells_per_column`` cells (htm.core default values).

    ``compute(active_columns, learn)`` runs one step; ``run(cols_flat, cols_off, learn)`` runs
    a whole sequence in one compiled call. ``reset()`` clears the sequence state. The learned
    connections are shared; the sequence state lives in ``self.stream`` (a :class:`StreamState`),
    which callers may swap to interleave independent streams.
    """

    def __init__(
        self,
        columns: int = 2048,
        cells_per_column: int = 32,
        activation_threshold: int = 13,
        min_threshold: int = 10,
        initial_permanence: float = 0.21,
        connected_permanence: float = 0.5,
        max_new_synapse_count: int = 20,
        permanence_increment: float = 0.1,
        permanence_decrement: float = 0.1,
        predicted_segment_decrement: float = 0.0,
        max_segments_per_cell: int = 255,
        max_synapses_per_segment: int = 255,
        seed: int = 42,
        narrow_bursts_in_inference: bool = False,
        initial_segment_capacity: int = 1024,
        initial_synapse_capacity: int = 16384,
        defrag_min: int = 4096,
        defrag_ratio: int = 32,  # re-sort once 1/32 of the synapses are new: scattered lists cost a cache miss per visit
    ):
        if min_threshold < 1 or activation_threshold < 1:
            raise MemLMError("temporal memory thresholds must be >= 1; raise min_threshold / activation_threshold")
        if max_new_synapse_count < 1 or max_synapses_per_segment < max_new_synapse_count:
            raise MemLMError("temporal memory needs 1 <= max_new_synapse_count <= max_synapses_per_segment")
        self.columns = int(columns)
        self.cells_per_column = int(cells_per_column)
        self.num_cells = self.columns * self.cells_per_column
        self.fparams = np.array(
            [connected_permanence, initial_permanence, permanence_increment, permanence_decrement,
             predicted_segment_decrement],
            dtype=np.float64,
        )
        self.iparams = np.array(
            [cells_per_column, activation_threshold, min_threshold, max_new_synapse_count, max_segments_per_cell,
             max_synapses_per_segment, int(bool(narrow_bursts_in_inference))],
            dtype=np.int64,
        )
        self._alloc_segments(int(initial_segment_capacity))
        self._alloc_synapses(int(initial_synapse_capacity))
        self.cell_first_syn = np.full(self.num_cells, -1, dtype=np.int32)
        self.cell_first_seg = np.full(self.num_cells, -1, dtype=np.int32)
        self.cell_nseg = np.zeros(self.num_cells, dtype=np.int32)
        self.counters = np.zeros(9, dtype=np.int64)
        self.defrag_min = int(defrag_min)
        self.defrag_ratio = int(defrag_ratio)
        seed64 = (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64) or 1
        self.rng = np.array([seed64], dtype=np.uint64)
        self.stream = StreamState.empty()
        self.predictive_cells = np.zeros(0, dtype=np.int32)
        self.anomaly = 0.0

    # -- capacity ------------------------------------------------------------------------
    def _alloc_segments(self, cap: int) -> None:
        self.segs = np.full((6, cap), -1, dtype=np.int64)
        self.seg_counts = np.zeros((cap, 2), dtype=np.int32)
        self.seg_free = np.zeros(cap, dtype=np.int32)

    def _alloc_synapses(self, cap: int) -> None:
        self._syn_spare = None  # defragment()'s second buffer (allocated at the first sort)
        self._spare_dirty = 0
        self.syns = np.full((cap, Y_FIELDS), -1, dtype=np.int32)
        self.perm = self.syns.view(np.float32)  # the permanence lives in field Y_PERM of the same rows
        self.perm[:, Y_PERM] = 0.0
        self.syn_free = np.zeros(cap, dtype=np.int32)

    def _grow(self, seg_need: int, syn_need: int) -> None:
        c = self.counters
        seg_cap = self.segs.shape[1]
        if seg_cap - c[C_SEG_HW] + c[C_SEG_FREE] < seg_need:
            new = max(2 * seg_cap, int(c[C_SEG_HW]) + seg_need)
            segs, counts, free = self.segs, self.seg_counts, self.seg_free
            self._alloc_segments(new)
            self.segs[:, :seg_cap] = segs
            self.seg_counts[:seg_cap] = counts
            self.seg_free[:seg_cap] = free
        syn_cap = self.syns.shape[0]
        if syn_cap - c[C_SYN_HW] + c[C_SYN_FREE] < syn_need:
            new = max(2 * syn_cap, int(c[C_SYN_HW]) + syn_need)
            syns, free = self.syns, self.syn_free
            self._alloc_synapses(new)
            self.syns[:syn_cap] = syns
            self.syn_free[:syn_cap] = free

    def defragment(self) -> None:
        """Renumber the live synapses so each presynaptic cell's outgoing synapses are
        contiguous and in list order (segment activation then reads memory sequentially).

        Semantics are unchanged: segment ids stay, only synapse ids and list order move, and
        no rule depends on either (ties are broken by presynaptic cell, not list position)."""
        c = self.counters
        hw = int(c[C_SYN_HW])
        spare = self._syn_spare
        if spare is None or spare.shape != self.syns.shape:
            spare = np.full(self.syns.shape, -1, dtype=np.int32)
            spare.view(np.float32)[:, Y_PERM] = 0.0
            self._spare_dirty = 0
            self._new_id = np.empty(self.syns.shape[0], dtype=np.int32)
        n = _defragment(self.syns, spare, self._new_id, self.segs, self.cell_first_syn, c)
        if self._spare_dirty > n:  # rows the spare held when it was live: back to never used
            spare[n : self._spare_dirty] = -1
            spare.view(np.float32)[n : self._spare_dirty, Y_PERM] = 0.0
        old = self.syns
        self.syns, self.perm = spare, spare.view(np.float32)
        self._syn_spare, self._spare_dirty = old, hw

    def _defrag_at(self) -> int:
        """The synapses-ever-created count at which the next defragment is due: once the
        synapses grown since the last one reach ``1 / defrag_ratio`` of the live ones."""
        c = self.counters
        return int(c[C_SYN_AT_DEFRAG]) + max(self.defrag_min, int(c[C_NSYN]) // self.defrag_ratio)

    def _maybe_defragment(self) -> None:
        if self.counters[C_SYN_CREATED] >= self._defrag_at():
            self.defragment()

    # -- compute -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence context (call at sequence boundaries)."""
        self.stream = StreamState.empty()
        self.predictive_cells = np.zeros(0, dtype=np.int32)

    def run(self, cols_flat: np.ndarray, cols_off: np.ndarray, learn: bool = True) -> TMOutput:
        """Run T steps; step t's active columns are ``cols_flat[cols_off[t]:cols_off[t+1]]`` (sorted)."""
        cols_flat = np.ascontiguousarray(cols_flat, dtype=np.int32)
        cols_off = np.ascontiguousarray(cols_off, dtype=np.int64)
        n_steps = len(cols_off) - 1
        max_cols = int(np.diff(cols_off).max()) if n_steps > 0 else 0
        cpc = self.cells_per_column
        out_active = np.empty(max(1, int(cols_off[-1]) * cpc), dtype=np.int32)
        out_active_off = np.zeros(n_steps + 1, dtype=np.int64)
        out_winners = np.empty(max(1, int(cols_off[-1]) * cpc), dtype=np.int32)
        out_winners_off = np.zeros(n_steps + 1, dtype=np.int64)
        out_anomaly = np.zeros(n_steps, dtype=np.float32)
        cap = max(self.num_cells, max_cols * cpc, 1)
        prev_active = np.zeros(cap, dtype=np.int32)
        prev_winners = np.zeros(cap, dtype=np.int32)
        prev_active[: len(self.stream.active)] = self.stream.active
        prev_winners[: len(self.stream.winners)] = self.stream.winners
        n_prev = np.array([len(self.stream.active), len(self.stream.winners)], dtype=np.int64)
        predictive = np.zeros(self.num_cells, dtype=np.int32)
        n_pred = np.zeros(1, dtype=np.int64)
        seg_res = np.zeros(1, dtype=np.int64)
        syn_res = np.zeros(1, dtype=np.int64)
        if learn:
            self._maybe_defragment()
        # inference breaks ties by a hash of (generator state, column) and draws nothing, so learning
        # off changes no state and its result does not depend on how the sequence is split into calls
        rng = self.rng if learn else self.rng.copy()
        t = 0
        never = np.iinfo(np.int64).max
        while True:
            done = _tm_run(
                cols_flat, cols_off[t:], bool(learn), self.columns, self.fparams, self.iparams,
                self.segs, self.seg_counts, self.syns, self.perm, self.cell_first_syn, self.cell_first_seg,
                self.cell_nseg, self.seg_free, self.syn_free, self.counters, rng,
                prev_active, prev_winners, n_prev,
                out_active, out_active_off[t:], out_winners, out_winners_off[t:], out_anomaly[t:], predictive, n_pred,
                seg_res, syn_res, self._defrag_at() if learn else never,
            )
            t += done
            if t >= n_steps:
                break
            if self.counters[C_SYN_CREATED] >= self._defrag_at():
                self.defragment()
            else:
                self._grow(int(seg_res[0]), int(syn_res[0]))
        self.stream = StreamState(prev_active[: n_prev[0]].copy(), prev_winners[: n_prev[1]].copy(), self.stream.context)
        self.predictive_cells = predictive[: n_pred[0]].copy()
        if n_steps:
            self.anomaly = float(out_anomaly[-1])
        return TMOutput(out_active[: out_active_off[-1]], out_active_off, out_winners[: out_winners_off[-1]],
                        out_winners_off, out_anomaly)

    def compute(self, active_columns: np.ndarray, learn: bool = True) -> np.ndarray:
        """One step; returns the sorted active cells. ``self.predictive_cells``, ``self.anomaly``,
        ``self.active_cells`` and ``self.winner_cells`` describe the result."""
        cols = np.unique(np.asarray(active_columns, dtype=np.int32))
        out = self.run(cols, np.array([0, len(cols)], dtype=np.int64), learn)
        return out.active_at(0)

    # -- views -----------------------------------------------------------------------------
    @property
    def active_cells(self) -> np.ndarray:
        return self.stream.active

    @property
    def winner_cells(self) -> np.ndarray:
        return self.stream.winners

    def predicted_columns(self) -> np.ndarray:
        return np.unique(self.predictive_cells // self.cells_per_column)

    @property
    def num_segments(self) -> int:
        return int(self.counters[C_NSEG])

    @property
    def num_synapses(self) -> int:
        return int(self.counters[C_NSYN])

    @property
    def iteration(self) -> int:
        return int(self.counters[C_ITER])

    def segments_of(self, cell: int) -> list[int]:
        out, g = [], int(self.cell_first_seg[cell])
        while g != -1:
            out.append(g)
            g = int(self.segs[S_NEXT, g])
        return sorted(out)

    def synapses_of(self, segment: int) -> list[tuple[int, float]]:
        """(presynaptic cell, permanence) of every synapse of a segment, sorted by cell."""
        out, s = [], int(self.segs[S_FIRST, segment])
        while s != -1:
            out.append((int(self.syns[s, Y_PRE]), float(self.perm[s, Y_PERM])))
            s = int(self.syns[s, Y_NSEG])
        return sorted(out)

    def cell_of(self, segment: int) -> int:
        return int(self.segs[S_CELL, segment])

    def create_segment(self, cell: int) -> int:
        """Create an empty segment on ``cell`` (for tests and hand-built memories)."""
        self._grow(1, 0)
        return int(_create_segment(cell, int(self.iparams[I_MAXSEG]), self.segs, self.syns, self.cell_first_syn,
                                   self.cell_first_seg, self.cell_nseg, self.seg_free, self.syn_free, self.counters))

    def create_synapse(self, segment: int, presynaptic_cell: int, permanence: float) -> None:
        self._grow(0, 1)
        _create_synapse(segment, presynaptic_cell, np.float32(permanence), self.segs, self.syns, self.perm,
                        self.cell_first_syn, self.syn_free, self.counters)

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything that defines the memory, cut to the used prefix of the capacity arrays."""
        seg_hw = int(self.counters[C_SEG_HW])
        syn_hw = int(self.counters[C_SYN_HW])
        return {
            "segs": self.segs[:, :seg_hw].copy(),
            "seg_free": self.seg_free[: int(self.counters[C_SEG_FREE])].copy(),
            "syns": self.syns[:syn_hw, :Y_PERM].copy(),
            "perm": self.perm[:syn_hw, Y_PERM].copy(),
            "syn_free": self.syn_free[: int(self.counters[C_SYN_FREE])].copy(),
            "cell_first_syn": self.cell_first_syn.copy(),
            "cell_first_seg": self.cell_first_seg.copy(),
            "cell_nseg": self.cell_nseg.copy(),
            "counters": self.counters.copy(),
            "rng": self.rng.view(np.int64).copy(),
            "stream_active": self.stream.active.copy(),
            "stream_winners": self.stream.winners.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        st = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in state.items()}
        if st["cell_first_syn"].shape[0] != self.num_cells:
            raise MemLMError(
                f"temporal memory state has {st['cell_first_syn'].shape[0]} cells, the config has {self.num_cells}; "
                "use the checkpoint's config"
            )
        counters = st["counters"].astype(np.int64)
        seg_hw, syn_hw = int(counters[C_SEG_HW]), int(counters[C_SYN_HW])
        self._alloc_segments(max(seg_hw * 2, 1024))
        self._alloc_synapses(max(syn_hw * 2, 16384))
        self.segs[:, :seg_hw] = st["segs"]
        self.seg_free[: len(st["seg_free"])] = st["seg_free"]
        self.syns[:syn_hw, :Y_PERM] = st["syns"]
        self.perm[:syn_hw, Y_PERM] = st["perm"]
        self.syn_free[: len(st["syn_free"])] = st["syn_free"]
        self.cell_first_syn = st["cell_first_syn"].astype(np.int32).copy()
        self.cell_first_seg = st["cell_first_seg"].astype(np.int32).copy()
        self.cell_nseg = st["cell_nseg"].astype(np.int32).copy()
        self.counters = counters.copy()
        self.rng = st["rng"].astype(np.int64).view(np.uint64).copy()
        self.stream = StreamState(st["stream_active"].astype(np.int32).copy(),
                                  st["stream_winners"].astype(np.int32).copy())
        self.predictive_cells = np.zeros(0, dtype=np.int32)
