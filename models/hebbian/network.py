"""A columnar sequence network that learns with local Hebbian / STDP-style plasticity.

Layout
    Every vocabulary unit ``u`` owns a column of ``C`` neurons (ids ``u*C .. u*C+C-1``).
    Each neuron has ``S`` outgoing synapse slots (``targets[n, s]`` = postsynaptic neuron or
    -1, ``weights[n, s]`` in ``[0, w_max]``), so memory is ``N*S`` rather than ``N*N`` and the
    network grows by appending rows (capacity doubles; learned weights are copied, never
    rebuilt).

One step (unit ``y`` arrives), rate neurons with a threshold:
    1. two drives were computed at the end of the previous step:
       - the *context drive*: summed weights from the winners of the last ``trace_len``
         steps, lag ``l`` scaled by ``trace_decay**l`` (an STDP-like eligibility trace);
       - the *general drive*: summed weights from the currently active neurons (all of a
         column's neurons when it burst, i.e. every context it has seen).
       The prediction is the unit whose column holds the neuron with the most context drive
       among those the last winners alone drive to ``threshold``; the general drive is used
       only when the context predicts nothing.
    2. inside column ``y``, neurons that the last winners alone drive to ``threshold`` were
       *predicted in context*: the k of them with the most context drive win
       (k-winners-take-all inhibition) and become active. Otherwise the column *bursts*: one
       winner is chosen to learn the new context - a neuron the last winners already reach
       (sub-threshold) if any, else the least used one (homeostasis spreads contexts over the
       column; ties are broken by a deterministic hash, so a run is reproducible and
       resumable) - and k-winners-take-all inhibition lets it fire together with the k-1
       neurons of the column that the general context drives most (the most used ones when
       nothing drives them): the contexts this unit was seen in, for generalisation. The
       first unit of an utterance (no context) always uses its column's first neuron.
    3. plasticity, local to the synapses between recent and current winners:
       - depression of mispredictions: synapses from the last winners onto neurons predicted
         in context whose column did not fire, ``w *= 1 - lr * depression``;
       - STDP depression (post before pre): current winners -> last winners,
         ``w *= 1 - lr * stdp_ltd``;
       - potentiation (pre before post): winners at lag ``l`` -> current winners,
         ``w += lr * hebbian_strength * trace_decay**l * (w_max - w)``; a new synapse takes
         the weakest slot;
       - heterosynaptic decay ``w *= 1 - lr * decay`` of the other synapses of the neuron
         that fired last, and a budget ``sum_s w <= row_budget`` per neuron (normalisation),
       so weights stay in ``[0, w_max]`` and every learning step changes them.

Because the winner chosen inside a column depends on what preceded it, the same unit gets
different neurons in different contexts; a chain of winners is a high-order sequence memory
("the" after "on" is not the "the" that starts the sentence).

The sequence loop is inherently sequential (each step depends on the last), so it is one
numba-compiled kernel over flat arrays touching only the active neurons' rows (O(trace_len*k*S) per step). Without numba the same function runs as plain Python (``MEMLM_HEBBIAN_NO_JIT=1``
forces that; tests check both agree).
"""
from __future__ import annotations

import os

import numpy as np
import torch

NO_TARGET = -1
NO_CONTEXT = -2  # prediction code: nothing was active before this step
RETIRE_SWEEP = 32  # retired columns whose incoming synapses are cleared together

try:  # pragma: no cover - depends on the environment
    if os.environ.get("MEMLM_HEBBIAN_NO_JIT", "") not in ("", "0"):
        raise ImportError("disabled")
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

    def njit(*args, **kwargs):
        if args and callable(args[0]):
            return args[0]
        return lambda f: f


# state slots (int64 array)
_N_ACTIVE, _N_TG, _N_TC, _HASH_STEP, _LEARN_STEPS, _HEAD, _N_HIST, _N_T0 = range(8)
_STATE_LEN = 8
# params slots (float64 array)
(_P_C, _P_S, _P_LR, _P_HEB, _P_DEP, _P_LTD, _P_DECAY, _P_WMAX, _P_THR, _P_K, _P_BUDGET, _P_SEED,
 _P_TRACE, _P_GAMMA) = range(14)


@njit(cache=True)
def _hash01(seed, step, cell):
    """Deterministic pseudo-random number in [0, 1); 31-bit arithmetic, so Python and numba agree."""
    x = (seed * 1000003 + step * 7919 + cell * 104729 + 12345) & 0x7FFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
    x = ((x ^ (x >> 12)) * 0x297A2D39) & 0x7FFFFFFF
    x = x ^ (x >> 15)
    return (x & 0xFFFFFF) / 16777216.0


@njit(cache=True)
def _compute_drives(targets, weights, drive_0, touched_0, drive_c, touched_c, drive_g, touched_g, active, hist, hist_n,
                    state, params):
    """Rebuild the drives: from the last winners (drive_0), from the winner trace (drive_c, the
    context drive) and from the active set (drive_g, the general drive)."""
    S = int(params[_P_S])
    gamma = params[_P_GAMMA]
    m = hist.shape[0]
    for j in range(state[_N_TC]):
        drive_c[touched_c[j]] = 0.0
    for j in range(state[_N_TG]):
        drive_g[touched_g[j]] = 0.0
    for j in range(state[_N_T0]):
        drive_0[touched_0[j]] = 0.0
    n_t0 = 0
    if state[_N_HIST] > 0:
        h = state[_HEAD]
        for a in range(hist_n[h]):
            r = hist[h, a]
            for s in range(S):
                t = targets[r, s]
                w = weights[r, s]
                if t >= 0 and w > 0.0:
                    if drive_0[t] == 0.0:
                        touched_0[n_t0] = t
                        n_t0 += 1
                    drive_0[t] += w
    state[_N_T0] = n_t0
    n_tc = 0
    g = 1.0
    for lag in range(state[_N_HIST]):
        slot_h = (state[_HEAD] - lag) % m
        for a in range(hist_n[slot_h]):
            r = hist[slot_h, a]
            for s in range(S):
                t = targets[r, s]
                w = weights[r, s]
                if t >= 0 and w > 0.0:
                    if drive_c[t] == 0.0:
                        touched_c[n_tc] = t
                        n_tc += 1
                    drive_c[t] += np.float32(g * w)
        g *= gamma
    n_tg = 0
    for a in range(state[_N_ACTIVE]):
        r = active[a]
        for s in range(S):
            t = targets[r, s]
            w = weights[r, s]
            if t >= 0 and w > 0.0:
                if drive_g[t] == 0.0:
                    touched_g[n_tg] = t
                    n_tg += 1
                drive_g[t] += w
    state[_N_TC] = n_tc
    state[_N_TG] = n_tg


@njit(cache=True)
def _potentiate_row(targets, weights, r, posts, n_post, g, wmax, hit):
    """pre row ``r`` -> each post: ``w += g (wmax - w)``; a missing synapse takes the weakest free slot."""
    S = targets.shape[1]
    for b in range(n_post):
        q = posts[b]
        slot = -1
        for s in range(S):
            if targets[r, s] == q:
                slot = s
                break
        if slot >= 0:
            w = weights[r, slot]
            weights[r, slot] = np.float32(w + g * (wmax - w))
            hit[slot] = True
        else:
            bw = 1e30
            for s in range(S):
                if not hit[s] and weights[r, s] < bw:
                    bw = weights[r, s]
                    slot = s
            if slot >= 0:
                targets[r, slot] = q
                weights[r, slot] = np.float32(g * wmax)
                hit[slot] = True


@njit(cache=True)
def _strongest_unit(touched, n_touched, drive, gate, alive, thr, C):
    """The live unit with the largest ``drive`` among the touched neurons whose ``gate`` drive
    reaches ``thr`` (ties: lowest unit id); (-1, 0.0) when none. ``gate`` is ``drive`` itself for
    the burst fallback, the last winners' drive for the in-context prediction."""
    best = -1
    best_v = 0.0
    for j in range(n_touched):
        t = touched[j]
        v = drive[t]
        u = t // C
        if alive[u] and gate[t] >= thr and (v > best_v or (v == best_v and best >= 0 and u < best)):
            best_v = v
            best = u
    return best, best_v


@njit(cache=True)
def _run(ids, learn, targets, weights, usage, alive, drive_0, touched_0, drive_c, touched_c, drive_g, touched_g, active,
         hist, hist_n, state, params, preds):
    """Present ``ids`` in order. Writes each step's prediction into ``preds``; returns sum |dw|."""
    C = int(params[_P_C])
    S = int(params[_P_S])
    lr = params[_P_LR]
    gain = lr * params[_P_HEB]
    dep = 1.0 - lr * params[_P_DEP]
    ltd = 1.0 - lr * params[_P_LTD]
    dec = 1.0 - lr * params[_P_DECAY]
    wmax = params[_P_WMAX]
    thr = params[_P_THR]
    k_win = int(params[_P_K])
    budget = params[_P_BUDGET]
    seed = int(params[_P_SEED])
    gamma = params[_P_GAMMA]
    m = hist.shape[0]
    change = 0.0
    new_active = np.empty(C, np.int64)
    new_winners = np.empty(C, np.int64)
    chosen = np.zeros(C, np.bool_)
    lag0 = np.zeros(C, np.float64)
    old_row = np.empty(S, np.float32)
    hit = np.zeros(S, np.bool_)
    for i in range(ids.shape[0]):
        y = ids[i]
        base = y * C
        n_hist = state[_N_HIST]
        head = state[_HEAD]
        # 1. prediction for this step: among neurons the last winners drive to threshold, the one
        #    with the most context drive; the general (burst) drive only as a fallback
        if n_hist == 0:
            preds[i] = NO_CONTEXT
        else:
            best, best_v = _strongest_unit(touched_0, state[_N_T0], drive_c, drive_0, alive, thr, C)
            if best < 0:
                # the burst fallback has no gate of its own: any positive drive may win, as before
                best, best_v = _strongest_unit(touched_g, state[_N_TG], drive_g, drive_g, alive, -np.inf, C)
            preds[i] = best if best_v >= thr else -1
        # 2. k-winners-take-all inside column y. A neuron is predicted in context when the last
        #    winners alone drive it to threshold; the trace (older lags) only ranks candidates.
        for c in range(C):
            chosen[c] = False
            lag0[c] = drive_0[base + c]
        n_pred = 0
        for c in range(C):
            if lag0[c] >= thr:
                n_pred += 1
        nn_act = 0
        nn_win = 0
        if n_pred > 0:
            k = min(k_win, n_pred)
            for _ in range(k):
                bc = -1
                bv = -1.0
                for c in range(C):
                    v = drive_c[base + c]
                    if not chosen[c] and lag0[c] >= thr and v > bv:
                        bv = v
                        bc = c
                chosen[bc] = True
                new_active[nn_act] = base + bc
                new_winners[nn_win] = base + bc
                nn_act += 1
                nn_win += 1
        else:
            bc = 0
            bv = lag0[0]
            for c in range(1, C):
                if lag0[c] > bv:
                    bv = lag0[c]
                    bc = c
            if bv <= 0.0 and n_hist > 0:  # a new context: the least used neuron (deterministic tie-break)
                bu = 1e30
                for c in range(C):
                    v = usage[base + c] + 1e-3 * _hash01(seed, state[_HASH_STEP], base + c)
                    if v < bu:
                        bu = v
                        bc = c
                state[_HASH_STEP] += 1
            # no context at all (start of an utterance): always the column's first neuron
            new_winners[0] = base + bc
            nn_win = 1
            # the burst: k-winners-take-all over the column by general drive (then usage); the
            # learning winner always fires
            chosen[bc] = True
            new_active[0] = base + bc
            nn_act = 1
            for _ in range(min(k_win, C) - 1):
                bj = -1
                bs = -1.0
                for c in range(C):
                    v = drive_g[base + c] + 1e-6 * usage[base + c]
                    if not chosen[c] and v > bs:
                        bs = v
                        bj = c
                if bj < 0:
                    break
                chosen[bj] = True
                new_active[nn_act] = base + bj
                nn_act += 1
        # 3. plasticity
        if learn:
            state[_LEARN_STEPS] += 1
            for j in range(nn_win):
                usage[new_winners[j]] += 1.0
            if n_hist > 0:
                # a. depression of the last winners' synapses onto predicted cells whose column did not fire
                #    ("predicted" = the last winners alone reach threshold, drive_0, as in step 2)
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
                # b. STDP: post-before-pre (current winners -> last winners) is weakened
                if ltd < 1.0:
                    for a in range(nn_win):
                        r = new_winners[a]
                        for s in range(S):
                            t = targets[r, s]
                            if t >= 0:
                                for b in range(hist_n[head]):
                                    if hist[head, b] == t:
                                        w_old = weights[r, s]
                                        w_new = np.float32(w_old * ltd)
                                        change += abs(w_old - w_new)
                                        weights[r, s] = w_new
                                        break
                # c. potentiation from the winner trace (lag l scaled by gamma^l) onto the current winners
                g = gain
                for lag in range(n_hist):
                    slot_h = (head - lag) % m
                    for a in range(hist_n[slot_h]):
                        r = hist[slot_h, a]
                        for s in range(S):
                            old_row[s] = weights[r, s]
                            hit[s] = False
                            if lag == 0:  # heterosynaptic decay of the learning neuron's other synapses
                                weights[r, s] = np.float32(weights[r, s] * dec)
                        _potentiate_row(targets, weights, r, new_winners, nn_win, g, wmax, hit)
                        total = 0.0
                        for s in range(S):
                            w = weights[r, s]
                            if w > wmax:
                                w = wmax
                            if w < 0.0:
                                w = 0.0
                            weights[r, s] = w
                            total += w
                        scale = budget / total if total > budget else 1.0
                        for s in range(S):
                            w_new = np.float32(weights[r, s] * scale)
                            weights[r, s] = w_new
                            change += abs(w_new - old_row[s])
                    g *= gamma
        # 4. new state: push the winners on the trace, then the drives for the next step
        head = (head + 1) % m
        for j in range(nn_win):
            hist[head, j] = new_winners[j]
        hist_n[head] = nn_win
        state[_HEAD] = head
        state[_N_HIST] = min(n_hist + 1, m)
        for j in range(nn_act):
            active[j] = new_active[j]
        state[_N_ACTIVE] = nn_act
        _compute_drives(targets, weights, drive_0, touched_0, drive_c, touched_c, drive_g, touched_g, active, hist, hist_n,
                        state, params)
    return change


class ColumnNetwork:
    def __init__(
        self,
        n_units: int,
        cells_per_column: int = 8,
        synapses_per_cell: int = 48,
        learning_rate: float = 0.3,
        hebbian_strength: float = 1.0,
        depression: float = 0.05,
        stdp_ltd: float = 0.05,
        decay: float = 0.002,
        w_max: float = 1.0,
        threshold: float = 0.2,
        k_winners: int = 4,
        trace_len: int = 3,
        trace_decay: float = 0.5,
        row_budget: float | None = None,
        seed: int = 0,
    ) -> None:
        self.C = int(cells_per_column)
        self.S = int(synapses_per_cell)
        if self.C < 1 or self.S < 1:
            raise ValueError("cells_per_column and synapses_per_cell must be >= 1")
        self.lr = float(learning_rate)
        self.hebbian_strength = float(hebbian_strength)
        self.depression = float(depression)
        self.stdp_ltd = float(stdp_ltd)
        self.decay = float(decay)
        self.w_max = float(w_max)
        self.threshold = float(threshold)
        self.k_winners = max(1, min(int(k_winners), self.C))
        self.trace_len = max(1, int(trace_len))
        self.trace_decay = float(trace_decay)
        self.row_budget = float(row_budget) if row_budget is not None else 0.5 * self.S * self.w_max
        self.seed = int(seed)
        self.params = np.array(
            [self.C, self.S, self.lr, self.hebbian_strength, self.depression, self.stdp_ltd, self.decay,
             self.w_max, self.threshold, self.k_winners, self.row_budget, self.seed, self.trace_len, self.trace_decay],
            dtype=np.float64,
        )
        m = self.trace_len
        self._touched_0 = np.zeros(self.C * self.S, dtype=np.int64)
        self._touched_c = np.zeros(m * self.C * self.S, dtype=np.int64)
        self._touched_g = np.zeros(self.C * self.S, dtype=np.int64)
        self._active = np.zeros(self.C, dtype=np.int64)
        self._hist = np.zeros((m, self.C), dtype=np.int64)
        self._hist_n = np.zeros(m, dtype=np.int64)
        self._state = np.zeros(_STATE_LEN, dtype=np.int64)
        self.abs_change = 0.0  # sum |dw| over the life of the network
        self._pending_retired = 0
        self._allocate(0)
        self.grow(n_units)

    def _allocate(self, n_units: int) -> None:
        self.n_units = 0
        self._cap = 0
        self._targets = np.full((0, self.S), NO_TARGET, dtype=np.int64)
        self._weights = np.zeros((0, self.S), dtype=np.float32)
        self._usage = np.zeros(0, dtype=np.float32)
        self._alive = np.zeros(0, dtype=np.bool_)
        self._drive_0 = np.zeros(0, dtype=np.float32)
        self._drive_c = np.zeros(0, dtype=np.float32)
        self._drive_g = np.zeros(0, dtype=np.float32)
        self._state[[_N_T0, _N_TC, _N_TG]] = 0
        self.grow(n_units)

    # -- views --------------------------------------------------------------------------
    @property
    def n_neurons(self) -> int:
        return self.n_units * self.C

    @property
    def targets(self) -> torch.Tensor:
        return torch.from_numpy(self._targets[: self.n_neurons])

    @property
    def weights(self) -> torch.Tensor:
        """Synaptic weights ``[neurons, synapses_per_cell]`` (a view: it changes as the network learns)."""
        return torch.from_numpy(self._weights[: self.n_neurons])

    @property
    def usage(self) -> torch.Tensor:
        return torch.from_numpy(self._usage[: self.n_neurons])

    @property
    def alive(self) -> torch.Tensor:
        return torch.from_numpy(self._alive[: self.n_units])

    @property
    def learning_steps(self) -> int:
        return int(self._state[_LEARN_STEPS])

    @property
    def has_context(self) -> bool:
        return bool(self._state[_N_HIST] > 0)

    def active_neurons(self) -> list[int]:
        return self._active[: self._state[_N_ACTIVE]].tolist()

    def winner_neurons(self) -> list[int]:
        if not self.has_context:
            return []
        h = int(self._state[_HEAD])
        return self._hist[h, : self._hist_n[h]].tolist()

    def n_synapses(self) -> int:
        return int(np.count_nonzero(self._weights[: self.n_neurons] > 0))

    def n_connected(self) -> int:
        """Synapses strong enough to drive a prediction on their own (learned transitions)."""
        return int(np.count_nonzero(self._weights[: self.n_neurons] >= self.threshold))

    # -- growth -------------------------------------------------------------------------
    def grow(self, n_units: int) -> int:
        """Add columns up to ``n_units``; learned weights are kept as they are."""
        n_units = int(n_units)
        extra = n_units - self.n_units
        if extra <= 0:
            return 0
        if n_units > self._cap:
            cap = max(n_units, 2 * self._cap, 64)
            rows = cap * self.C
            n = self.n_neurons

            def enlarge(old, shape, fill, dtype, used):
                new = np.full(shape, fill, dtype=dtype)
                new[:used] = old[:used]
                return new

            self._targets = enlarge(self._targets, (rows, self.S), NO_TARGET, np.int64, n)
            self._weights = enlarge(self._weights, (rows, self.S), 0.0, np.float32, n)
            self._usage = enlarge(self._usage, rows, 0.0, np.float32, n)
            self._alive = enlarge(self._alive, cap, False, np.bool_, self.n_units)
            self._drive_0 = enlarge(self._drive_0, rows, 0.0, np.float32, n)
            self._drive_c = enlarge(self._drive_c, rows, 0.0, np.float32, n)
            self._drive_g = enlarge(self._drive_g, rows, 0.0, np.float32, n)
            self._cap = cap
        self._alive[self.n_units : n_units] = True
        self.n_units = n_units
        return extra

    def retire(self, unit_ids: list[int]) -> None:
        """Silence the columns of removed units: outgoing synapses are cleared now, incoming ones
        in batches of ``RETIRE_SWEEP`` units (until then they only point at masked columns)."""
        units = np.array(sorted({int(u) for u in unit_ids if 0 <= int(u) < self.n_units}), dtype=np.int64)
        if units.size == 0:
            return
        self.reset()
        self._alive[units] = False
        cells = (units[:, None] * self.C + np.arange(self.C)).ravel()
        self._targets[cells] = NO_TARGET
        self._weights[cells] = 0.0
        self._pending_retired += int(units.size)
        if self._pending_retired >= RETIRE_SWEEP:
            self.sweep_retired()

    def sweep_retired(self) -> None:
        """Clear every synapse that points into a retired column."""
        n = self.n_neurons
        t = self._targets[:n]
        dead = (t >= 0) & ~self._alive[np.maximum(t, 0) // self.C]
        t[dead] = NO_TARGET
        self._weights[:n][dead] = 0.0
        self._pending_retired = 0

    # -- state --------------------------------------------------------------------------
    def _refresh(self) -> None:
        _compute_drives(
            self._targets, self._weights, self._drive_0, self._touched_0, self._drive_c, self._touched_c,
            self._drive_g, self._touched_g, self._active, self._hist, self._hist_n, self._state, self.params,
        )

    def reset(self) -> None:
        """Forget the current context (start of a new utterance); learned weights stay."""
        self._state[[_N_ACTIVE, _N_HIST]] = 0
        self._refresh()

    def snapshot(self):
        return (self._active.copy(), self._hist.copy(), self._hist_n.copy(), self._state.copy())

    def restore(self, snap) -> None:
        active, hist, hist_n, state = snap
        self._active[:], self._hist[:], self._hist_n[:] = active, hist, hist_n
        # the tie-break counter too: a run without learning (scoring, replying) must leave no trace
        keep = [_N_ACTIVE, _HEAD, _N_HIST, _HASH_STEP]
        self._state[keep] = state[keep]
        self._refresh()

    def context_tensors(self) -> dict[str, torch.Tensor]:
        """The current context (what :meth:`reset` forgets) as tensors: active set, winner
        history and its cursor (n_active, head, n_hist); the learned weights are not in it."""
        return {
            "active": torch.from_numpy(self._active.copy()),
            "hist": torch.from_numpy(self._hist.copy()),
            "hist_n": torch.from_numpy(self._hist_n.copy()),
            "cursor": torch.from_numpy(self._state[[_N_ACTIVE, _HEAD, _N_HIST]].copy()),
        }

    def empty_context_tensors(self) -> dict[str, torch.Tensor]:
        """A context with nothing active and no history (:meth:`reset`'s, with the ring head at 0)."""
        return {k: torch.zeros_like(v) for k, v in self.context_tensors().items()}

    def load_context_tensors(self, ctx: dict[str, torch.Tensor]) -> None:
        shapes = {"active": self._active.shape, "hist": self._hist.shape, "hist_n": self._hist_n.shape, "cursor": (3,)}
        for name, shape in shapes.items():
            if tuple(ctx[name].shape) != tuple(shape):
                raise ValueError(f"context {name} has shape {tuple(ctx[name].shape)}, this network expects {shape}")
        self._active[:] = ctx["active"].cpu().numpy()
        self._hist[:] = ctx["hist"].cpu().numpy()
        self._hist_n[:] = ctx["hist_n"].cpu().numpy()
        self._state[[_N_ACTIVE, _HEAD, _N_HIST]] = ctx["cursor"].cpu().numpy()
        self._refresh()

    # -- running ------------------------------------------------------------------------
    def feed(self, ids, learn: bool = True) -> np.ndarray:
        """Present units in order; returns each step's prediction (-1 none, -2 no context)."""
        arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_units):
            raise IndexError(f"unit id out of range [0, {self.n_units})")
        preds = np.empty(arr.size, dtype=np.int64)
        if arr.size:
            self.abs_change += _run(
                arr, bool(learn), self._targets, self._weights, self._usage, self._alive,
                self._drive_0, self._touched_0, self._drive_c, self._touched_c, self._drive_g, self._touched_g,
                self._active, self._hist, self._hist_n, self._state, self.params, preds,
            )
        return preds

    def step(self, unit: int, learn: bool = True) -> int:
        """Present one unit; returns what the network had predicted for it (-1: nothing)."""
        p = int(self.feed([unit], learn)[0])
        return -1 if p == NO_CONTEXT else p

    def unit_scores(self) -> torch.Tensor:
        """Score of every unit for the next step: the strongest drive in its column.

        Neurons the last winners drive to threshold score their context drive (trace
        included); when there is none, the general drive of the (bursting) active set does.
        """
        if not self.has_context or self.n_units == 0:
            return torch.zeros(self.n_units)
        n, U = self.n_neurons, self.n_units
        alive = self.alive
        gated = torch.from_numpy(np.where(self._drive_0[:n] >= self.threshold, self._drive_c[:n], 0.0))
        s = gated.view(U, self.C).amax(1).masked_fill(~alive, 0.0)
        if float(s.max()) < self.threshold:
            s = torch.from_numpy(self._drive_g[:n]).view(U, self.C).amax(1).masked_fill(~alive, 0.0)
        return s

    def predict(self) -> int:
        """The predicted next unit, or -1 when nothing is predicted."""
        s = self.unit_scores()
        if s.numel() == 0:
            return -1
        best = int(s.argmax())
        return best if float(s[best]) >= self.threshold else -1

    # -- persistence --------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        n = self.n_neurons
        # synapses are stored sparsely: most slots of a growing network are empty
        used = np.flatnonzero(self._targets[:n].ravel() >= 0)
        return {
            "shape": torch.tensor([n, self.S], dtype=torch.int64),
            "syn_index": torch.from_numpy(used.astype(np.int64)),
            "syn_target": torch.from_numpy(self._targets[:n].ravel()[used].astype(np.int32)),
            "syn_weight": torch.from_numpy(self._weights[:n].ravel()[used].copy()),
            "usage": torch.from_numpy(self._usage[:n].copy()),
            "alive": torch.from_numpy(self._alive[: self.n_units].copy()),
            "active": torch.from_numpy(self._active.copy()),
            "hist": torch.from_numpy(self._hist.copy()),
            "hist_n": torch.from_numpy(self._hist_n.copy()),
            "state": torch.from_numpy(self._state.copy()),
            "abs_change": torch.tensor(self.abs_change, dtype=torch.float64),
            "pending_retired": torch.tensor(self._pending_retired, dtype=torch.int64),
        }

    def load_state_tensors(self, st: dict[str, torch.Tensor]) -> None:
        alive = st["alive"].numpy().astype(np.bool_)
        n_units = alive.size
        dense = "shape" not in st  # the first state format stored the full slot arrays
        shape = tuple(st["weights"].shape) if dense else tuple(int(x) for x in st["shape"].tolist())
        if shape != (n_units * self.C, self.S) or tuple(st["hist"].shape) != self._hist.shape:
            raise ValueError(f"state has synapses {shape} but this network expects ({n_units * self.C}, {self.S})")
        self._allocate(n_units)
        n = self.n_neurons
        if dense:
            self._targets[:n] = st["targets"].numpy().astype(np.int64)
            self._weights[:n] = st["weights"].numpy().astype(np.float32)
        else:
            idx = st["syn_index"].numpy().astype(np.int64)
            flat_t = self._targets[:n].reshape(-1)
            flat_w = self._weights[:n].reshape(-1)
            flat_t[idx] = st["syn_target"].numpy().astype(np.int64)
            flat_w[idx] = st["syn_weight"].numpy().astype(np.float32)
        self._usage[:n] = st["usage"].numpy().astype(np.float32)
        self._alive[:n_units] = alive
        self._active[:] = st["active"].numpy()
        self._hist[:] = st["hist"].numpy()
        self._hist_n[:] = st["hist_n"].numpy()
        self._state[:] = st["state"].numpy()
        self._state[[_N_T0, _N_TC, _N_TG]] = 0  # the drives are rebuilt from the active set and the trace
        self.abs_change = float(st["abs_change"])
        self._pending_retired = int(st["pending_retired"]) if "pending_retired" in st else 0
        self._refresh()
