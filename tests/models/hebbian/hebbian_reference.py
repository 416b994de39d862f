"""A slow, independent re-statement of the ColumnNetwork learning rule, for tests only.

Written from the rule as the network module documents it (steps 1-4 of its docstring), with
dense per-step arrays and plain loops instead of the kernel's touched lists, ring buffers
and flat state vector. Weights are float32 like the network's, and every float32 rounding the
rule specifies (drives, each weight update) happens at the same point, so predictions must
agree exactly and weights to float32 precision.
"""
from __future__ import annotations

import numpy as np

NO_TARGET, NO_CONTEXT = -1, -2


def hash01(seed: int, step: int, cell: int) -> float:
    """The network's documented deterministic tie-break hash (31-bit integer mixing)."""
    x = (seed * 1000003 + step * 7919 + cell * 104729 + 12345) & 0x7FFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
    x = ((x ^ (x >> 12)) * 0x297A2D39) & 0x7FFFFFFF
    x = x ^ (x >> 15)
    return (x & 0xFFFFFF) / 16777216.0


class ReferenceNetwork:
    def __init__(self, n_units: int, C: int, S: int, lr: float, hebbian_strength: float, depression: float,
                 stdp_ltd: float, decay: float, w_max: float, threshold: float, k_winners: int, trace_len: int,
                 trace_decay: float, row_budget: float, seed: int) -> None:
        self.C, self.S, self.n_units = C, S, n_units
        self.lr, self.heb, self.dep, self.ltd, self.decay = lr, hebbian_strength, depression, stdp_ltd, decay
        self.w_max, self.thr, self.k, self.trace_len, self.gamma = w_max, threshold, k_winners, trace_len, trace_decay
        self.budget, self.seed = row_budget, seed
        n = n_units * C
        self.targets = np.full((n, S), NO_TARGET, dtype=np.int64)
        self.weights = np.zeros((n, S), dtype=np.float32)
        self.usage = np.zeros(n, dtype=np.float32)
        self.alive = np.ones(n_units, dtype=bool)
        self.trace: list[list[int]] = []  # winners of the last steps, newest first
        self.active: list[int] = []
        self.hash_step = 0
        self.learning_steps = 0
        self.abs_change = 0.0

    def reset(self) -> None:
        self.trace, self.active = [], []

    # -- drives ----------------------------------------------------------------------------
    def _drive(self, sources: list[int], scale: float = 1.0, into: np.ndarray | None = None) -> np.ndarray:
        d = np.zeros(len(self.usage), dtype=np.float32) if into is None else into
        for r in sources:
            for s in range(self.S):
                t, w = self.targets[r, s], self.weights[r, s]
                if t >= 0 and w > 0.0:
                    d[t] += np.float32(scale * float(w))  # the product in float64, then float32 like the weights
        return d

    def drives(self):
        """(last winners alone, gamma^lag-weighted winner trace, active set)."""
        lag0 = self._drive(self.trace[0]) if self.trace else np.zeros(len(self.usage), dtype=np.float32)
        ctx = np.zeros(len(self.usage), dtype=np.float32)
        for lag, winners in enumerate(self.trace):
            self._drive(winners, self.gamma ** lag, ctx)
        return lag0, ctx, self._drive(self.active)

    @staticmethod
    def _best_unit(values: np.ndarray, candidates: np.ndarray, C: int) -> tuple[int, float]:
        """Unit of the candidate neuron with the largest value; ties go to the lowest unit."""
        best, best_v = -1, 0.0
        for t in np.flatnonzero(candidates):
            u, v = t // C, float(values[t])
            if v > best_v or (v == best_v and best >= 0 and u < best):
                best, best_v = u, v
        return best, best_v

    # -- one step ----------------------------------------------------------------------------
    def step(self, y: int, learn: bool) -> int:
        C, thr = self.C, self.thr
        lag0, ctx, general = self.drives()
        cell_alive = np.repeat(self.alive, C)
        if not self.trace:
            pred = NO_CONTEXT
        else:  # 1. prediction: context drive among cells the last winners drive to threshold
            best, best_v = self._best_unit(ctx, cell_alive & (lag0 >= thr), C)
            if best < 0:
                best, best_v = self._best_unit(general, cell_alive & (general > 0), C)
            pred = best if best_v >= thr else -1
        cells = y * C + np.arange(C)
        predicted = [c for c in range(C) if lag0[cells[c]] >= thr]
        if predicted:  # 2a. predicted in context: the k with most context drive fire and win
            ranked = sorted(predicted, key=lambda c: (-float(ctx[cells[c]]), c))
            winners = [int(cells[c]) for c in ranked[: min(self.k, len(predicted))]]
            active = list(winners)
        else:  # 2b. burst
            col = [float(lag0[cells[c]]) for c in range(C)]
            learner = max(range(C), key=lambda c: (col[c], -c))
            if col[learner] <= 0.0 and self.trace:  # a new context: least used cell
                learner = min(range(C), key=lambda c: (float(self.usage[cells[c]])
                                                       + 1e-3 * hash01(self.seed, self.hash_step, int(cells[c])), c))
                self.hash_step += 1
            winners = [int(cells[learner])]
            rest = sorted((c for c in range(C) if c != learner),
                          key=lambda c: (-(float(general[cells[c]]) + 1e-6 * float(self.usage[cells[c]])), c))
            active = winners + [int(cells[c]) for c in rest[: min(self.k, C) - 1]]
        if learn:
            self._learn(y, winners, lag0)
        self.trace = [winners] + self.trace[: self.trace_len - 1]
        self.active = active
        return pred

    # -- 3. plasticity -----------------------------------------------------------------------
    def _set(self, r: int, s: int, w) -> None:
        w = np.float32(w)
        self.abs_change += abs(float(self.weights[r, s]) - float(w))
        self.weights[r, s] = w

    def _learn(self, y: int, winners: list[int], lag0: np.ndarray) -> None:
        self.learning_steps += 1
        for n in winners:
            self.usage[n] += 1.0
        if not self.trace:
            return
        last = self.trace[0]
        lr = self.lr
        if lr * self.dep > 0:  # a. mispredictions: cells predicted in context whose column did not fire
            for r in last:
                for s in range(self.S):
                    t = self.targets[r, s]
                    if t >= 0 and t // self.C != y and lag0[t] >= self.thr:
                        self._set(r, s, float(self.weights[r, s]) * (1.0 - lr * self.dep))
        if lr * self.ltd > 0:  # b. post before pre is weakened
            for r in winners:
                for s in range(self.S):
                    if self.targets[r, s] >= 0 and self.targets[r, s] in last:
                        self._set(r, s, float(self.weights[r, s]) * (1.0 - lr * self.ltd))
        gain = lr * self.heb
        for lag, pres in enumerate(self.trace):  # c. pre before post, scaled by gamma^lag
            g = gain * self.gamma ** lag
            for r in pres:
                old = self.weights[r].astype(np.float64)
                row_w = self.weights[r].astype(np.float64)  # every update in float64, stored as float32
                if lag == 0:  # heterosynaptic decay of the last winners' synapses
                    row_w = np.float32(row_w * (1.0 - lr * self.decay)).astype(np.float64)
                taken = np.zeros(self.S, dtype=bool)
                for q in winners:
                    slots = np.flatnonzero(self.targets[r] == q)
                    if slots.size:
                        s = int(slots[0])
                        row_w[s] = np.float32(row_w[s] + g * (self.w_max - row_w[s]))
                    else:  # a new synapse takes the weakest slot not used in this step
                        free = np.flatnonzero(~taken)
                        if free.size == 0:
                            continue
                        s = int(free[np.argmin(row_w[free])])
                        self.targets[r, s] = q
                        row_w[s] = np.float32(g * self.w_max)
                    taken[s] = True
                row_w = np.clip(row_w, 0.0, self.w_max)
                total = float(row_w.sum())
                if total > self.budget:  # the row budget: scale the whole row down
                    row_w = row_w * (self.budget / total)
                self.weights[r] = np.float32(row_w)
                self.abs_change += float(np.abs(self.weights[r].astype(np.float64) - old).sum())

    def feed(self, ids, learn: bool) -> np.ndarray:
        return np.array([self.step(int(u), learn) for u in ids], dtype=np.int64)

    def scores(self) -> np.ndarray:
        """Per-unit next-step score: gated context drive, else the active set's general drive."""
        if not self.trace:
            return np.zeros(self.n_units)
        lag0, ctx, general = self.drives()
        s = np.where(lag0 >= self.thr, ctx, 0.0).reshape(self.n_units, self.C).max(1) * self.alive
        if s.max() < self.thr:
            s = general.reshape(self.n_units, self.C).max(1) * self.alive
        return s
