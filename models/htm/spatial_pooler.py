"""Spatial pooler (BAMI, with htm.core's defaults), global inhibition, numba inner loop.

State (all numpy, see :meth:`SpatialPooler.state_dict`):

- ``potential`` uint8 [C, I]: the potential pool of every column (potentialPct of the inputs);
- ``perm`` float32 [C, I]: permanences, zero outside the potential pool;
- ``boost`` float32 [C]; ``active_duty`` / ``overlap_duty`` / ``min_overlap_duty`` float32 [C];
- ``tie`` float32 [C]: a fixed tiny per-column tie-breaker for the inhibition ranking;
- ``counters`` int64 [2]: learning iterations (twice, as htm.core keeps iteration and
  learning iteration apart; inference counts nothing, so learning off changes no state);
- ``conn_t`` uint8 [I, C] is derived (connected = perm >= synPermConnected, transposed for
  a contiguous overlap loop) and rebuilt on load, not saved.

One step (BAMI "Spatial Pooling Algorithm Details"):

1. overlap[c] = number of connected synapses (perm >= synPermConnected) on active inputs;
2. global inhibition: the ``round(density * C)`` columns with the largest boosted overlap
   (overlap * boost) among those with overlap >= stimulusThreshold and overlap > 0 win;
3. learning (if on), on the winners' potential synapses: +synPermActiveInc where the input
   is active, -synPermInactiveDec elsewhere, clipped to [0, 1];
4. duty cycles: moving averages over min(dutyCyclePeriod, iteration) of "column active"
   and "overlap > 0 (and >= stimulusThreshold)";
5. weak columns (overlap duty < minOverlapDuty) get all their potential permanences
   raised by synPermConnected / 10 ("bumping");
6. boost = exp((density - active duty) * boostStrength);
7. every ``update_period`` learning steps minOverlapDuty = minPctOverlapDutyCycles *
   max(overlap duty) (global inhibition).

Learning off leaves every array unchanged.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from memlm.core.errors import MemLMError

EPS = 1e-5


@njit(cache=True)
def _sp_run(
    inputs_flat, inputs_off, learn, potential, pot_idx, perm, conn_t, boost, active_duty, overlap_duty, min_overlap_duty,
    tie, counters, fparams, iparams, out_cols, out_off,
):
    """Run the SP over a sequence of sparse inputs; winners go to out_cols (CSR by out_off)."""
    connected = fparams[0]
    inc = fparams[1]
    dec = fparams[2]
    density = fparams[3]
    boost_strength = fparams[4]
    min_pct_overlap = fparams[5]
    stimulus = fparams[6]
    duty_period = iparams[0]
    update_period = iparams[1]
    n_cols, n_in = perm.shape
    k = max(1, int(round(density * n_cols)))
    overlap = np.zeros(n_cols, dtype=np.float32)
    score = np.empty(n_cols, dtype=np.float32)
    is_input = np.zeros(n_in, dtype=np.uint8)
    col_active = np.zeros(n_cols, dtype=np.uint8)
    n_steps = len(inputs_off) - 1
    pos = 0
    out_off[0] = 0
    for t in range(n_steps):
        a0 = inputs_off[t]
        a1 = inputs_off[t + 1]
        for i in range(a0, a1):
            is_input[inputs_flat[i]] = 1
        # 1. overlap, from the transposed connected matrix (contiguous rows per input bit)
        overlap[:] = 0.0
        for i in range(a0, a1):
            row_t = conn_t[inputs_flat[i]]
            for c in range(n_cols):
                overlap[c] += row_t[c]
        # 2. global inhibition to k winners
        n_cand = 0
        for c in range(n_cols):
            if overlap[c] > 0.0 and overlap[c] >= stimulus:
                score[c] = overlap[c] * boost[c] + tie[c]
                n_cand += 1
            else:
                score[c] = -1.0
        n_win = min(k, n_cand)
        start = pos
        if n_win > 0:
            # k-th largest score by selection, then every column at or above it (ties are
            # made impossible by the fixed tie-breaker), in column order
            kth = -np.partition(-score, n_win - 1)[n_win - 1]
            for c in range(n_cols):
                if score[c] >= kth and score[c] >= 0.0 and pos - start < n_win:
                    out_cols[pos] = c
                    pos += 1
        out_off[t + 1] = pos
        if learn:
            counters[0] += 1
            counters[1] += 1
            it = counters[1]
            # 3. permanence learning on the winners' potential synapses
            thr = np.float32(connected - EPS)
            f_inc = np.float32(inc)
            f_dec = np.float32(dec)
            for j in range(start, pos):
                c = out_cols[j]
                col_active[c] = 1
                row = perm[c]
                pot = pot_idx[c]
                for q in range(pot.shape[0]):
                    i = pot[q]
                    old = row[i]
                    p = old + f_inc if is_input[i] else old - f_dec
                    if p > 1.0:
                        p = np.float32(1.0)
                    elif p < 0.0:
                        p = np.float32(0.0)
                    row[i] = p
                    if (p >= thr) != (old >= thr):  # touch the transposed copy only on a flip
                        conn_t[i, c] = 1 - conn_t[i, c]
            # 4. duty cycles
            period = duty_period if it > duty_period else it
            for c in range(n_cols):
                ov = 1.0 if (overlap[c] > 0.0 and overlap[c] >= stimulus) else 0.0
                overlap_duty[c] = (overlap_duty[c] * (period - 1) + ov) / period
                active_duty[c] = (active_duty[c] * (period - 1) + col_active[c]) / period
            # 5. bump weak columns
            bump = connected / 10.0
            for c in range(n_cols):
                if overlap_duty[c] < min_overlap_duty[c]:
                    row = perm[c]
                    pot = potential[c]
                    for i in range(n_in):
                        if pot[i]:
                            was = row[i] >= connected - EPS
                            p = min(1.0, row[i] + bump)
                            row[i] = p
                            if (p >= connected - EPS) != was:
                                conn_t[i, c] = 1
            # 6. boost factors
            if boost_strength > 0.0:
                for c in range(n_cols):
                    boost[c] = np.exp((density - active_duty[c]) * boost_strength)
            # 7. minimum overlap duty cycles (global)
            if it % update_period == 0:
                mx = 0.0
                for c in range(n_cols):
                    mx = max(mx, overlap_duty[c])
                for c in range(n_cols):
                    min_overlap_duty[c] = min_pct_overlap * mx
            for j in range(start, pos):
                col_active[out_cols[j]] = 0
        for i in range(a0, a1):
            is_input[inputs_flat[i]] = 0
    return pos


class SpatialPooler:
    """Global-inhibition spatial pooler over sparse binary inputs.

    Args follow htm.core's names: ``potential_pct`` (potentialPct), ``density``
    (localAreaDensity), ``stimulus_threshold``, ``syn_perm_active_inc``,
    ``syn_perm_inactive_dec``, ``syn_perm_connected``, ``min_pct_overlap_duty_cycles``,
    ``duty_cycle_period``, ``boost_strength``; ``init_connected_pct`` is the fraction of
    potential synapses that start connected.
    """

    STATE_KEYS = ("potential", "perm", "boost", "active_duty", "overlap_duty", "min_overlap_duty", "tie", "counters")

    def __init__(
        self,
        input_size: int,
        columns: int = 2048,
        potential_pct: float = 0.5,
        density: float = 0.02,
        stimulus_threshold: float = 0.0,
        syn_perm_active_inc: float = 0.05,
        syn_perm_inactive_dec: float = 0.008,
        syn_perm_connected: float = 0.1,
        min_pct_overlap_duty_cycles: float = 0.001,
        duty_cycle_period: int = 1000,
        boost_strength: float = 0.0,
        init_connected_pct: float = 0.5,
        update_period: int = 50,
        seed: int = 1,
    ):
        if not 0.0 < potential_pct <= 1.0:
            raise MemLMError(f"spatial pooler potential_pct={potential_pct} must be in (0, 1]")
        if not 0.0 < density < 1.0:
            raise MemLMError(f"spatial pooler density={density} must be in (0, 1)")
        self.input_size = int(input_size)
        self.columns = int(columns)
        self.fparams = np.array(
            [syn_perm_connected, syn_perm_active_inc, syn_perm_inactive_dec, density, boost_strength,
             min_pct_overlap_duty_cycles, stimulus_threshold],
            dtype=np.float64,
        )
        self.iparams = np.array([duty_cycle_period, update_period], dtype=np.int64)
        rng = np.random.default_rng(seed)
        n_pot = max(1, int(round(potential_pct * self.input_size)))
        self.potential = np.zeros((self.columns, self.input_size), dtype=np.uint8)
        self.perm = np.zeros((self.columns, self.input_size), dtype=np.float32)
        for c in range(self.columns):
            idx = rng.choice(self.input_size, size=n_pot, replace=False)
            self.potential[c, idx] = 1
            conn = rng.random(n_pot) < init_connected_pct
            # connected: uniform in [connected, 1]; unconnected: uniform in [0, connected)
            p = np.where(
                conn,
                syn_perm_connected + (1.0 - syn_perm_connected) * rng.random(n_pot),
                syn_perm_connected * rng.random(n_pot),
            )
            self.perm[c, idx] = p.astype(np.float32)
        self.pot_idx = self._potential_index()
        self.conn_t = self._connected_t()
        self.boost = np.ones(self.columns, dtype=np.float32)
        self.active_duty = np.zeros(self.columns, dtype=np.float32)
        self.overlap_duty = np.zeros(self.columns, dtype=np.float32)
        self.min_overlap_duty = np.zeros(self.columns, dtype=np.float32)
        self.tie = (rng.random(self.columns) * 1e-4).astype(np.float32)
        self.counters = np.zeros(2, dtype=np.int64)

    def _potential_index(self) -> np.ndarray:
        """int32 [C, n_pot]: the input indices of each column's potential pool (derived)."""
        n_pot = int(self.potential[0].sum())
        return np.ascontiguousarray(np.nonzero(self.potential)[1].reshape(self.columns, n_pot).astype(np.int32))

    def _connected_t(self) -> np.ndarray:
        """uint8 [I, C]: derived connected matrix, transposed so an input bit's columns are contiguous."""
        return np.ascontiguousarray((self.perm >= self.fparams[0] - EPS).T.astype(np.uint8))

    @property
    def num_active(self) -> int:
        return max(1, int(round(self.fparams[3] * self.columns)))

    @property
    def iteration(self) -> int:
        return int(self.counters[0])

    def run(self, inputs_flat: np.ndarray, inputs_off: np.ndarray, learn: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """SP over T sparse inputs given as CSR (flat indices, offsets[T+1]); returns winners CSR."""
        inputs_flat = np.ascontiguousarray(inputs_flat, dtype=np.int32)
        inputs_off = np.ascontiguousarray(inputs_off, dtype=np.int64)
        n = len(inputs_off) - 1
        out_cols = np.empty(max(1, n * self.num_active), dtype=np.int32)
        out_off = np.empty(n + 1, dtype=np.int64)
        used = _sp_run(
            inputs_flat, inputs_off, bool(learn), self.potential, self.pot_idx, self.perm, self.conn_t, self.boost, self.active_duty,
            self.overlap_duty, self.min_overlap_duty, self.tie, self.counters, self.fparams, self.iparams,
            out_cols, out_off,
        )
        return out_cols[:used], out_off

    def compute(self, active_inputs: np.ndarray, learn: bool = True) -> np.ndarray:
        """One step: sorted active input indices -> sorted winning column indices."""
        active_inputs = np.asarray(active_inputs, dtype=np.int32)
        cols, _ = self.run(active_inputs, np.array([0, len(active_inputs)], dtype=np.int64), learn)
        return cols

    def overlaps(self, active_inputs: np.ndarray) -> np.ndarray:
        """Raw overlap of every column with an input (connected synapses on active bits)."""
        conn = self.perm[:, np.asarray(active_inputs, dtype=np.int64)] >= self.fparams[0] - EPS
        return conn.sum(axis=1)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).copy() for k in self.STATE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        for k in self.STATE_KEYS:
            cur = getattr(self, k)
            v = np.asarray(state[k].numpy() if hasattr(state[k], "numpy") else state[k]).astype(cur.dtype)
            if v.shape != cur.shape:
                raise MemLMError(f"spatial pooler state '{k}' has shape {v.shape}, expected {cur.shape}; check the config")
            setattr(self, k, np.ascontiguousarray(v))
        self.pot_idx = self._potential_index()
        self.conn_t = self._connected_t()
