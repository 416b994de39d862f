"""Spiking mode of the columnar network: leaky integrate-and-fire neurons with pair-based STDP.

:class:`LIFColumnNetwork` keeps :class:`ColumnNetwork`'s layout (a column of ``C`` neurons per
vocabulary unit, ``S`` sparse synapse slots per neuron, growth, retirement, persistence, and
the same next-unit read-out from the synaptic drive of the last winners), but each presented
unit is a *window of T time steps of spiking dynamics* instead of one threshold decision:

    membrane   v <- v * exp(-1/tau_m) + I_ext + g_rec * I_rec      (per step, per neuron of the column)
    spike      when v >= theta0 + a (adaptive threshold) and not refractory; then v <- v_reset,
               the neuron is refractory for t_ref steps, and a <- a + theta_plus (homeostasis;
               a decays back with time constant theta_tau)
    k-WTA      first-spike winner-take-all by the column's inhibitory interneuron: at most
               k distinct neurons spike in a window (those that cross first, then by v - theta);
               once k have spiked the others are held at v_reset for the rest of the window
    input      I_ext drives the presented column (only its first neuron at the start of an
               utterance, so every utterance starts from the same cell); I_rec is the synaptic
               current from the neurons that spiked in the last ``trace_len`` windows (their
               trace-weighted drive, held for the window), so neurons predicted by the context
               cross first and win: the same unit gets different neurons in different contexts
    STDP       pair-based, with per-neuron traces x+ (tau_plus) and x- (tau_minus) bumped by 1
               at each spike: a post spike potentiates pre->post by
               ``lr * hebbian_strength * x+_pre * (w_max - w)`` (a missing synapse takes the
               weakest slot); a pre spike depresses pre->post by ``lr * stdp_ltd * x-_post * w``
               (post before pre). Also, as in the rate mode: depression of the last winners'
               synapses onto predicted neurons whose column did not fire, heterosynaptic decay
               of the last winners' other synapses, and a weight budget per neuron.

Membrane potentials start each window at ``v_reset`` (the column was silent since it last
fired and the leak is fast next to the gap), so between windows the state is the winners'
history, the spike traces and the adaptive thresholds. Without learning the dynamics run the
same way but no weight, threshold, trace or clock changes. The loop is one numba kernel over
the presented column; ``tests/models/hebbian/lif_reference.py`` is a dense, plain-numpy
reimplementation that the tests check against it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from memlm.models.hebbian.network import (
    _HASH_STEP, _HEAD, _LEARN_STEPS, _N_ACTIVE, _N_HIST, _N_T0, _P_BUDGET, _P_C, _P_DECAY, _P_DEP, _P_GAMMA, _P_HEB,
    _P_K, _P_LR, _P_LTD, _P_S, _P_SEED, _P_THR, _P_WMAX, NO_CONTEXT, ColumnNetwork, _compute_drives, _hash01,
    _strongest_unit, njit,
)

# lif params slots (float64 array)
(_L_T, _L_TAU_M, _L_THETA0, _L_RESET, _L_REF, _L_IEXT, _L_GREC, _L_TAU_P, _L_TAU_N, _L_TH_PLUS, _L_TH_TAU) = range(11)


@njit(cache=True)
def _connect(targets, weights, r, q, gain, wmax):
    """pre row ``r`` -> post ``q``: ``w += gain (wmax - w)``; a missing synapse takes the weakest slot. Returns |dw|."""
    S = targets.shape[1]
    slot = -1
    for s in range(S):
        if targets[r, s] == q:
            slot = s
            break
    if slot < 0:
        bw = 1e30
        for s in range(S):
            if weights[r, s] < bw:
                bw = weights[r, s]
                slot = s
        old = weights[r, slot]
        targets[r, slot] = q
        weights[r, slot] = np.float32(gain * wmax)
        return abs(weights[r, slot] - old)
    w = weights[r, slot]
    weights[r, slot] = np.float32(w + gain * (wmax - w))
    return abs(weights[r, slot] - w)


@njit(cache=True)
def _run_lif(ids, learn, targets, weights, usage, alive, drive_0, touched_0, drive_c, touched_c, drive_g, touched_g,
             active, hist, hist_n, state, params, lif, theta_a, t_a, x_plus, x_minus, t_x, clock, spike_counts, preds):
    """Present ``ids`` in order, one LIF window each. Writes predictions into ``preds``, the
    spikes of each window into ``spike_counts``; returns sum |dw|."""
    C = int(params[_P_C])
    S = int(params[_P_S])
    lr = params[_P_LR]
    a_plus = lr * params[_P_HEB]
    a_minus = lr * params[_P_LTD]
    dep = 1.0 - lr * params[_P_DEP]
    dec = 1.0 - lr * params[_P_DECAY]
    wmax = params[_P_WMAX]
    thr = params[_P_THR]
    k_win = int(params[_P_K])
    budget = params[_P_BUDGET]
    seed = int(params[_P_SEED])
    T = int(lif[_L_T])
    alpha = math.exp(-1.0 / lif[_L_TAU_M])
    theta0 = lif[_L_THETA0]
    v_reset = lif[_L_RESET]
    t_ref = int(lif[_L_REF])
    i_ext = lif[_L_IEXT]
    g_rec = lif[_L_GREC]
    tau_p = lif[_L_TAU_P]
    tau_n = lif[_L_TAU_N]
    th_plus = lif[_L_TH_PLUS]
    th_tau = lif[_L_TH_TAU]
    m = hist.shape[0]
    change = 0.0
    v = np.zeros(C, np.float64)
    ref = np.zeros(C, np.int64)
    spikes = np.zeros(C, np.int64)
    fired = np.zeros(C, np.bool_)
    theta = np.zeros(C, np.float64)
    winners = np.empty(C, np.int64)
    for i in range(ids.shape[0]):
        y = ids[i]
        base = y * C
        n_hist = state[_N_HIST]
        head = state[_HEAD]
        # 1. the prediction for this step, from the drives (as in the rate mode)
        if n_hist == 0:
            preds[i] = NO_CONTEXT
        else:
            best, best_v = _strongest_unit(touched_0, state[_N_T0], drive_c, drive_0, alive, thr, C)
            preds[i] = best if best_v >= thr else -1
        now0 = clock[0]
        # 2. heterosynaptic decay of the last winners' synapses, before this window's STDP
        if learn and n_hist > 0 and dec < 1.0:
            for a in range(hist_n[head]):
                r = hist[head, a]
                for s in range(S):
                    w_old = weights[r, s]
                    w_new = np.float32(w_old * dec)
                    change += abs(w_old - w_new)
                    weights[r, s] = w_new
        # 3. the LIF window
        for c in range(C):
            v[c] = v_reset
            ref[c] = 0
            spikes[c] = 0
            theta[c] = theta0 + theta_a[base + c] * math.exp(-(now0 - t_a[base + c]) / th_tau)
        n_win = 0
        for step in range(T):
            now = now0 + step
            for c in range(C):
                fired[c] = False
                if ref[c] > 0:
                    ref[c] -= 1
                    continue
                if n_win >= k_win and spikes[c] == 0:  # inhibited: k neurons already won this window
                    v[c] = v_reset
                    continue
                inp = g_rec * drive_c[base + c]
                if n_hist > 0 or c == 0:
                    # the 1e-6 jitter only breaks exact ties, deterministically
                    inp += i_ext * (1.0 + 1e-6 * _hash01(seed, state[_HASH_STEP] + step, base + c))
                v[c] = v[c] * alpha + inp
            while True:  # spikes of this step, strongest first, within the k-WTA budget
                bc = -1
                bv = -1e30
                for c in range(C):
                    if fired[c] or ref[c] > 0 or v[c] < theta[c]:
                        continue
                    if spikes[c] == 0 and n_win >= k_win:
                        continue
                    if v[c] - theta[c] > bv:
                        bv = v[c] - theta[c]
                        bc = c
                if bc < 0:
                    break
                n = base + bc
                fired[bc] = True
                v[bc] = v_reset
                ref[bc] = t_ref
                if spikes[bc] == 0:
                    winners[n_win] = n
                    n_win += 1
                spikes[bc] += 1
                if learn:
                    theta[bc] += th_plus
                    # post spike: potentiate the synapses from earlier winners, by their x+ trace
                    for lag in range(n_hist):
                        slot_h = (head - lag) % m
                        for a in range(hist_n[slot_h]):
                            r = hist[slot_h, a]
                            xp = x_plus[r] * math.exp(-(now - t_x[r]) / tau_p)
                            if xp > 1e-6:
                                change += _connect(targets, weights, r, n, a_plus * xp, wmax)
                    # pre spike: depress this neuron's synapses onto neurons that spiked before, by their x- trace
                    if a_minus > 0.0:
                        for s in range(S):
                            q = targets[n, s]
                            if q >= 0:
                                xm = x_minus[q] * math.exp(-(now - t_x[q]) / tau_n)
                                if xm > 1e-6:
                                    w_old = weights[n, s]
                                    w_new = np.float32(w_old * (1.0 - a_minus * xm))
                                    change += abs(w_old - w_new)
                                    weights[n, s] = w_new
                    x_plus[n] = x_plus[n] * math.exp(-(now - t_x[n]) / tau_p) + 1.0
                    x_minus[n] = x_minus[n] * math.exp(-(now - t_x[n]) / tau_n) + 1.0
                    t_x[n] = now
        if n_win == 0:  # nothing crossed threshold in T steps: the most depolarised neuron wins, unlearned
            bc = 0
            for c in range(1, C):
                if v[c] > v[bc]:
                    bc = c
            winners[0] = base + bc
            n_win = 1
        for c in range(C):
            spike_counts[i, c] = spikes[c]
        if learn:
            state[_LEARN_STEPS] += 1
            state[_HASH_STEP] += T
            clock[0] = now0 + T
            for c in range(C):
                theta_a[base + c] = theta[c] - theta0
                t_a[base + c] = now0
            for j in range(n_win):
                usage[winners[j]] += 1.0
            if n_hist > 0:
                # depression of the last winners' synapses onto predicted neurons whose column did not fire
                if dep < 1.0:
                    for a in range(hist_n[head]):
                        r = hist[head, a]
                        for s in range(S):
                            t = targets[r, s]
                            if t >= 0 and t // C != y and drive_0[t] >= thr:
                                w_old = weights[r, s]
                                w_new = np.float32(w_old * dep)
                                change += abs(w_old - w_new)
                                weights[r, s] = w_new
                # weight bounds and the per-neuron budget on the rows that learned
                for lag in range(n_hist):
                    slot_h = (head - lag) % m
                    for a in range(hist_n[slot_h]):
                        r = hist[slot_h, a]
                        total = 0.0
                        for s in range(S):
                            w = min(max(weights[r, s], np.float32(0.0)), np.float32(wmax))
                            weights[r, s] = w
                            total += w
                        if total > budget:
                            scale = budget / total
                            for s in range(S):
                                w_old = weights[r, s]
                                w_new = np.float32(w_old * scale)
                                change += abs(w_old - w_new)
                                weights[r, s] = w_new
        # 4. the winners become the newest entry of the history; drives for the next step
        head = (head + 1) % m
        for j in range(n_win):
            hist[head, j] = winners[j]
            active[j] = winners[j]
        hist_n[head] = n_win
        state[_HEAD] = head
        state[_N_HIST] = min(n_hist + 1, m)
        state[_N_ACTIVE] = n_win
        _compute_drives(targets, weights, drive_0, touched_0, drive_c, touched_c, drive_g, touched_g, active, hist,
                        hist_n, state, params)
    return change


class LIFColumnNetwork(ColumnNetwork):
    """:class:`ColumnNetwork` with leaky integrate-and-fire dynamics and STDP (module docstring)."""

    neuron_model = "lif"
    _LIF_ARRAYS = ("theta_a", "t_a", "x_plus", "x_minus", "t_x")

    def __init__(self, n_units: int, steps: int = 8, tau_m: float = 10.0, v_threshold: float = 3.0,
                 v_reset: float = 0.0, refractory: int = 2, input_current: float = 1.0, recurrent_gain: float = 2.0,
                 tau_plus: float = 8.0, tau_minus: float = 8.0, theta_plus: float = 0.05, theta_tau: float = 20000.0,
                 **kw) -> None:
        if steps < 1 or tau_m <= 0 or tau_plus <= 0 or tau_minus <= 0 or theta_tau <= 0 or refractory < 0:
            raise ValueError("LIF: steps >= 1, refractory >= 0 and positive time constants are needed")
        self.lif = np.array([steps, tau_m, v_threshold, v_reset, refractory, input_current, recurrent_gain, tau_plus,
                             tau_minus, theta_plus, theta_tau], dtype=np.float64)
        self.steps = int(steps)
        self._clock = np.zeros(1, dtype=np.int64)
        self._lif_cap = 0
        self.theta_a = np.zeros(0, np.float64)
        self.t_a = np.zeros(0, np.int64)
        self.x_plus = np.zeros(0, np.float64)
        self.x_minus = np.zeros(0, np.float64)
        self.t_x = np.zeros(0, np.int64)
        self.last_spikes = np.zeros((0, 0), np.int64)
        super().__init__(n_units, **kw)

    def grow(self, n_units: int) -> int:
        extra = super().grow(n_units)
        rows = self._targets.shape[0]
        if rows != self._lif_cap:
            for name in self._LIF_ARRAYS:
                old = getattr(self, name)
                new = np.zeros(rows, dtype=old.dtype)
                new[: min(old.size, rows)] = old[:rows]
                setattr(self, name, new)
            self._lif_cap = rows
        return extra

    def _allocate(self, n_units: int) -> None:
        self._lif_cap = 0
        for name in self._LIF_ARRAYS:
            setattr(self, name, np.zeros(0, dtype=getattr(self, name).dtype))
        super()._allocate(n_units)

    @property
    def clock(self) -> int:
        """LIF time steps simulated with learning on."""
        return int(self._clock[0])

    def adaptive_thresholds(self) -> torch.Tensor:
        """The current threshold of every neuron: ``theta0 + a`` with ``a`` decayed to now."""
        n = self.n_neurons
        decay = np.exp(-(self.clock - self.t_a[:n]) / self.lif[_L_TH_TAU])
        return torch.from_numpy(self.lif[_L_THETA0] + self.theta_a[:n] * decay)

    def feed(self, ids, learn: bool = True) -> np.ndarray:
        arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_units):
            raise IndexError(f"unit id out of range [0, {self.n_units})")
        preds = np.empty(arr.size, dtype=np.int64)
        self.last_spikes = np.zeros((arr.size, self.C), dtype=np.int64)
        if arr.size:
            self.abs_change += _run_lif(
                arr, bool(learn), self._targets, self._weights, self._usage, self._alive,
                self._drive_0, self._touched_0, self._drive_c, self._touched_c, self._drive_g, self._touched_g,
                self._active, self._hist, self._hist_n, self._state, self.params, self.lif,
                self.theta_a, self.t_a, self.x_plus, self.x_minus, self.t_x, self._clock, self.last_spikes, preds,
            )
        return preds

    def unit_scores(self) -> torch.Tensor:
        """Every unit's score for the next step: its column's strongest context drive among the
        neurons the last winners drive to threshold (there is no burst set to fall back on)."""
        if not self.has_context or self.n_units == 0:
            return torch.zeros(self.n_units)
        n, U = self.n_neurons, self.n_units
        gated = torch.from_numpy(np.where(self._drive_0[:n] >= self.threshold, self._drive_c[:n], 0.0))
        return gated.view(U, self.C).amax(1).masked_fill(~self.alive, 0.0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        st = super().state_tensors()
        n = self.n_neurons
        st.update({f"lif_{name}": torch.from_numpy(getattr(self, name)[:n].copy()) for name in self._LIF_ARRAYS})
        st["lif_clock"] = torch.from_numpy(self._clock.copy())
        st["lif_params"] = torch.from_numpy(self.lif.copy())
        return st

    def load_state_tensors(self, st: dict[str, torch.Tensor]) -> None:
        if "lif_clock" not in st:
            raise ValueError("the state is of a rate-mode network, not a LIF one (neuron_model differs)")
        if not np.array_equal(st["lif_params"].numpy(), self.lif):
            raise ValueError("the state's LIF parameters differ from this network's")
        super().load_state_tensors(st)
        n = self.n_neurons
        for name in self._LIF_ARRAYS:
            getattr(self, name)[:n] = st[f"lif_{name}"].numpy()
        self._clock[:] = st["lif_clock"].numpy()
