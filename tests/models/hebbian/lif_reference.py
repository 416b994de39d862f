"""A slow re-statement of the LIF network's rule (``memlm.models.hebbian.lif``), for tests only.

Written from the module docstring with numpy vectors over the column, Python lists for the
winner history and a dict of spike times per neuron (traces are recomputed from the spike
times themselves, not kept as running sums), instead of the kernel's ring buffer, lazily
decayed trace arrays and flat state vector. Synapses use the same slot layout (which slot a
new synapse takes is part of the rule). Drives are summed in float64 here and float32 in the
kernel, so the tests compare weights to float32 precision and spikes/predictions exactly.
"""
from __future__ import annotations

import math

import numpy as np

from hebbian_reference import hash01

NO_TARGET, NO_CONTEXT = -1, -2


class ReferenceLIF:
    def __init__(self, n_units, C, S, lr, heb, dep, ltd, decay, w_max, thr, k, trace_len, gamma, budget, seed,
                 T, tau_m, theta0, v_reset, t_ref, i_ext, g_rec, tau_p, tau_n, th_plus, th_tau) -> None:
        self.__dict__.update(locals())
        del self.__dict__["self"]
        n = n_units * C
        self.targets = np.full((n, S), NO_TARGET, dtype=np.int64)
        self.weights = np.zeros((n, S), dtype=np.float32)
        self.theta_extra = np.zeros(n)  # a, as of time theta_time
        self.theta_time = np.zeros(n, dtype=np.int64)
        self.spike_times: dict[int, list[int]] = {}
        self.trace: list[list[int]] = []  # winners of the last windows, newest first
        self.clock = 0
        self.hash_step = 0

    def reset(self) -> None:
        self.trace = []

    def _x(self, neuron: int, now: int, tau: float) -> float:
        """Pair-based trace: sum over the neuron's earlier spikes (at or before now) of exp(-dt/tau)."""
        return sum(math.exp(-(now - t) / tau) for t in self.spike_times.get(neuron, []) if t <= now)

    def _drives(self):
        n = self.n_units * self.C
        d0, dc = np.zeros(n), np.zeros(n)
        for lag, winners in enumerate(self.trace):
            for r in winners:
                for t, w in zip(self.targets[r], self.weights[r]):
                    if t >= 0 and w > 0:
                        dc[t] += float(np.float32(self.gamma ** lag * w))
                        if lag == 0:
                            d0[t] += w
        return d0, dc

    def _potentiate(self, r: int, q: int, gain: float) -> None:
        row_t, row_w = self.targets[r], self.weights[r]
        hit = np.flatnonzero(row_t == q)
        if hit.size:
            s = hit[0]
            row_w[s] = np.float32(row_w[s] + gain * (self.w_max - row_w[s]))
        else:
            s = int(np.argmin(row_w))  # the weakest slot (the first of equals)
            row_t[s], row_w[s] = q, np.float32(gain * self.w_max)

    def feed(self, ids, learn: bool = True):
        preds, spikes_out = [], []
        C, S = self.C, self.S
        for y in ids:
            d0, dc = self._drives()
            if not self.trace:
                preds.append(NO_CONTEXT)
            else:
                gated = np.where(d0 >= self.thr, dc, 0.0).reshape(self.n_units, C).max(1)
                best = int(np.argmax(gated))
                preds.append(best if gated[best] >= self.thr and gated[best] > 0 else -1)
            base, now0 = y * C, self.clock
            cells = np.arange(base, base + C)
            if learn and self.trace:
                for r in self.trace[0]:
                    self.weights[r] = (self.weights[r] * (1.0 - self.lr * self.decay)).astype(np.float32)
            theta = self.theta0 + self.theta_extra[cells] * np.exp(-(now0 - self.theta_time[cells]) / self.th_tau)
            v = np.full(C, float(self.v_reset))
            refractory = np.zeros(C, dtype=np.int64)
            counts = np.zeros(C, dtype=np.int64)
            winners: list[int] = []
            for step in range(self.T):
                now = now0 + step
                for c in range(C):  # refractory and inhibited neurons do not integrate this step
                    if refractory[c] > 0:
                        refractory[c] -= 1
                    elif len(winners) >= self.k and counts[c] == 0:
                        v[c] = self.v_reset
                    else:
                        current = self.g_rec * dc[base + c]
                        if self.trace or c == 0:
                            current += self.i_ext * (1.0 + 1e-6 * hash01(self.seed, self.hash_step + step, base + c))
                        v[c] = v[c] * math.exp(-1.0 / self.tau_m) + current
                fired_now = np.zeros(C, dtype=bool)
                can = refractory == 0
                while True:
                    margin = v - theta
                    ok = can & ~fired_now & (v >= theta) & ((counts > 0) | (len(winners) < self.k))
                    if not ok.any():
                        break
                    c = int(np.flatnonzero(ok)[np.argmax(margin[ok])])
                    n = base + c
                    fired_now[c] = True
                    v[c], refractory[c] = self.v_reset, self.t_ref
                    if counts[c] == 0:
                        winners.append(n)
                    counts[c] += 1
                    if learn:
                        theta[c] += self.th_plus
                        for lag_winners in self.trace:
                            for r in lag_winners:
                                xp = self._x(r, now, self.tau_p)
                                if xp > 1e-6:
                                    self._potentiate(r, n, self.lr * self.heb * xp)
                        for s in range(S):
                            q = self.targets[n, s]
                            if q >= 0:
                                xm = self._x(q, now, self.tau_n)
                                if xm > 1e-6:
                                    self.weights[n, s] = np.float32(self.weights[n, s] * (1.0 - self.lr * self.ltd * xm))
                        self.spike_times.setdefault(n, []).append(now)
            if not winners:
                winners = [base + int(np.argmax(v))]
            spikes_out.append(counts.copy())
            if learn:
                self.hash_step += self.T
                self.clock = now0 + self.T
                self.theta_extra[cells] = theta - self.theta0
                self.theta_time[cells] = now0
                if self.trace:
                    for r in self.trace[0]:
                        for s in range(S):
                            t = self.targets[r, s]
                            if t >= 0 and t // C != y and d0[t] >= self.thr:
                                self.weights[r, s] = np.float32(self.weights[r, s] * (1.0 - self.lr * self.dep))
                    for lag_winners in self.trace:
                        for r in lag_winners:
                            row = np.clip(self.weights[r], 0.0, self.w_max).astype(np.float32)
                            total = float(row.astype(np.float64).sum())
                            if total > self.budget:
                                row = (row * (self.budget / total)).astype(np.float32)
                            self.weights[r] = row
            self.trace = ([winners] + self.trace)[: self.trace_len]
        return np.array(preds), np.array(spikes_out)
