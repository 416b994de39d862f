"""A columnar sequence network that learns with local Hebbian / STDP-style plasticity.

Layout
    Every vocabulary unit ``u`` owns a column of ``C`` neurons (ids ``u*C .. u*C+C-1``).
    Each neuron has ``S`` outgoing synapse slots (``targets[n, s]`` = postsynaptic neuron or
    -1, ``weights[n, s]`` in ``[0, w_max]``), so memory is ``N*S`` rather than ``N*N`` and the
    network grows by appending rows: learned weights are never rebuilt.

One step (unit ``y`` arrives), rate neurons with a threshold:
    1. drive ``d = sum of weights from the currently active neurons`` (computed after the
       previous step; it is also the prediction for this step);
    2. inside column ``y``, neurons with ``d >= threshold`` were *predicted*; the k most driven
       of them win (k-winners-take-all inhibition) and become active. If none was predicted the
       column *bursts*: all its neurons become active (the union of every context it has seen)
       and one winner is chosen to learn the new context - the most driven neuron if any has
       drive, else the least used one (homeostasis spreads contexts over the column);
    3. plasticity, all local to the synapses between two consecutive assemblies:
       - potentiation (pre before post): previous winners -> current winners,
         ``w += lr * hebbian_strength * (w_max - w)`` (a new synapse takes the weakest slot);
       - depression of mispredictions: synapses from the previous active neurons to neurons
         that were predicted but whose column did not fire, ``w *= 1 - lr * depression``;
       - STDP depression (post before pre): current winners -> previous winners;
       - heterosynaptic decay ``w *= 1 - lr * decay`` on every synapse of a presynaptic neuron
         that just learned, and a per-neuron budget ``sum_s w <= row_budget`` (normalisation);
       so weights stay in ``[0, w_max]`` and every learning step changes them.
    The next unit's score is the maximum drive over its column's neurons.

Because the winner chosen inside a column depends on what preceded it, the same unit gets
different neurons in different contexts; a chain of winners is a high-order sequence memory
("the" after "on" is not the "the" that starts the sentence).

All updates are tensor operations over the few active rows (O(k*S) per step), no Python
loop over synapses.
"""
from __future__ import annotations

import torch

NO_TARGET = -1


class ColumnNetwork:
    def __init__(
        self,
        n_units: int,
        cells_per_column: int = 8,
        synapses_per_cell: int = 48,
        learning_rate: float = 0.3,
        hebbian_strength: float = 1.0,
        depression: float = 0.2,
        stdp_ltd: float = 0.05,
        decay: float = 0.002,
        w_max: float = 1.0,
        threshold: float = 0.2,
        k_winners: int = 4,
        row_budget: float | None = None,
        seed: int = 0,
    ) -> None:
        self.C = int(cells_per_column)
        self.S = int(synapses_per_cell)
        self.lr = float(learning_rate)
        self.hebbian_strength = float(hebbian_strength)
        self.depression = float(depression)
        self.stdp_ltd = float(stdp_ltd)
        self.decay = float(decay)
        self.w_max = float(w_max)
        self.threshold = float(threshold)
        self.k_winners = max(1, min(int(k_winners), self.C))
        self.row_budget = float(row_budget) if row_budget is not None else 0.5 * self.S * self.w_max
        self.generator = torch.Generator().manual_seed(int(seed))

        self.n_units = 0
        self.targets = torch.full((0, self.S), NO_TARGET, dtype=torch.long)
        self.weights = torch.zeros(0, self.S)
        self.usage = torch.zeros(0)  # how often each neuron won (homeostasis)
        self.alive = torch.zeros(0, dtype=torch.bool)  # per unit column
        self.learning_steps = 0
        self.abs_change = 0.0  # sum |dw| over the life of the network
        self.last_abs_change = 0.0  # sum |dw| since reset_change_counter()
        self.reset()
        self.grow(n_units)

    # -- size ---------------------------------------------------------------------------
    @property
    def n_neurons(self) -> int:
        return self.n_units * self.C

    def n_synapses(self) -> int:
        return int((self.weights > 0).sum())

    def n_connected(self) -> int:
        """Synapses strong enough to drive a prediction on their own (learned transitions)."""
        return int((self.weights >= self.threshold).sum())

    def grow(self, n_units: int) -> int:
        """Add columns up to ``n_units``; existing rows (learned weights) are kept as they are."""
        extra = int(n_units) - self.n_units
        if extra <= 0:
            return 0
        rows = extra * self.C
        self.targets = torch.cat([self.targets, torch.full((rows, self.S), NO_TARGET, dtype=torch.long)])
        self.weights = torch.cat([self.weights, torch.zeros(rows, self.S)])
        self.usage = torch.cat([self.usage, torch.zeros(rows)])
        self.alive = torch.cat([self.alive, torch.ones(extra, dtype=torch.bool)])
        self.n_units = int(n_units)
        if self.active is not None:
            self.drive = self._compute_drive(self.active)
        return extra

    def retire(self, unit_ids: list[int]) -> None:
        """Silence the columns of removed units: their synapses in and out are cleared."""
        if not unit_ids:
            return
        units = torch.tensor(sorted(set(int(u) for u in unit_ids)), dtype=torch.long)
        units = units[units < self.n_units]
        self.alive[units] = False
        cells = (units[:, None] * self.C + torch.arange(self.C)).flatten()
        self.targets[cells] = NO_TARGET
        self.weights[cells] = 0.0
        incoming = torch.isin(self.targets.clamp_min(0) // self.C, units) & (self.targets >= 0)
        self.targets[incoming] = NO_TARGET
        self.weights[incoming] = 0.0
        self.reset()

    # -- state --------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current context (start of a new utterance); learned weights stay."""
        self.active: torch.Tensor | None = None
        self.winners: torch.Tensor | None = None
        self.drive: torch.Tensor | None = None

    def snapshot(self):
        return (self.active, self.winners, self.drive)

    def restore(self, snap) -> None:
        self.active, self.winners, self.drive = snap

    def _compute_drive(self, active: torch.Tensor) -> torch.Tensor:
        t = self.targets[active].flatten()
        w = self.weights[active].flatten()
        keep = t >= 0
        d = torch.zeros(self.n_neurons)
        d.index_add_(0, t[keep], w[keep])
        return d

    def unit_scores(self) -> torch.Tensor:
        """Score of every unit for the next step: the strongest drive in its column."""
        if self.drive is None:
            return torch.zeros(self.n_units)
        s = self.drive.view(self.n_units, self.C).amax(1)
        return s.masked_fill(~self.alive, 0.0)

    def predict(self) -> int:
        """The predicted next unit, or -1 when nothing is predicted."""
        s = self.unit_scores()
        if s.numel() == 0:
            return -1
        best = int(s.argmax())
        return best if float(s[best]) >= self.threshold else -1

    # -- one step -----------------------------------------------------------------------
    def step(self, unit: int, learn: bool = True) -> int:
        """Present ``unit``; returns what the network had predicted for this step (-1: nothing)."""
        predicted = self.predict()
        C = self.C
        base = unit * C
        d = self.drive
        dc = d[base : base + C] if d is not None else torch.zeros(C)
        pred = dc >= self.threshold
        n_pred = int(pred.sum())
        if n_pred > 0:
            k = min(self.k_winners, n_pred)
            idx = dc.masked_fill(~pred, float("-inf")).topk(k).indices
            winners = base + idx
            active = winners
        else:
            active = base + torch.arange(C)
            if float(dc.max()) > 0:
                win = int(dc.argmax())
            else:  # least used neuron, random tie-break
                noise = torch.rand(C, generator=self.generator) * 1e-3
                win = int((self.usage[base : base + C] + noise).argmin())
            winners = torch.tensor([base + win])
        if learn:
            self._learn(unit, winners, d)
        self.active, self.winners = active, winners
        self.drive = self._compute_drive(active)
        return predicted

    def _learn(self, unit: int, winners: torch.Tensor, d: torch.Tensor | None) -> None:
        self.learning_steps += 1
        self.usage[winners] += 1.0
        if self.winners is None or self.active is None:
            return
        lr = self.lr
        change = 0.0
        prev_w, prev_a = self.winners, self.active
        # depression of synapses that predicted a column that did not fire
        if d is not None and self.depression > 0:
            mis = (d >= self.threshold).nonzero().squeeze(1)
            mis = mis[(mis // self.C) != unit]
            if mis.numel():
                rows_t, rows_w = self.targets[prev_a], self.weights[prev_a]
                hit = torch.isin(rows_t, mis)
                new_w = torch.where(hit, rows_w * (1.0 - lr * self.depression), rows_w)
                change += float((new_w - rows_w).abs().sum())
                self.weights[prev_a] = new_w
        # STDP: post-before-pre pairs (current winners -> previous winners) are weakened
        if self.stdp_ltd > 0:
            rows_t, rows_w = self.targets[winners], self.weights[winners]
            hit = torch.isin(rows_t, prev_w)
            if bool(hit.any()):
                new_w = torch.where(hit, rows_w * (1.0 - lr * self.stdp_ltd), rows_w)
                change += float((new_w - rows_w).abs().sum())
                self.weights[winners] = new_w
        change += self._potentiate(prev_w, winners)
        self.abs_change += change
        self.last_abs_change += change

    def _potentiate(self, pre: torch.Tensor, post: torch.Tensor) -> float:
        m, n = pre.numel(), post.numel()
        rows_t = self.targets[pre]
        old_w = self.weights[pre]
        rows_w = old_w * (1.0 - self.lr * self.decay)  # heterosynaptic decay of the learning rows
        eq = rows_t.unsqueeze(2) == post.view(1, 1, n)  # [m, S, n]
        found = eq.any(1)  # [m, n]
        slot_hit = eq.any(2)  # [m, S]
        gain = self.lr * self.hebbian_strength
        rows_w = torch.where(slot_hit, rows_w + gain * (self.w_max - rows_w), rows_w)
        missing = ~found
        if bool(missing.any()):
            score = rows_w.masked_fill(slot_hit, float("inf"))
            weakest = score.topk(n, dim=1, largest=False).indices  # [m, n] distinct slots per row
            r = torch.arange(m).unsqueeze(1).expand(m, n)[missing]
            s = weakest[missing]
            rows_t[r, s] = post.unsqueeze(0).expand(m, n)[missing]
            rows_w[r, s] = gain * self.w_max
        rows_w = rows_w.clamp_(0.0, self.w_max)
        total = rows_w.sum(1, keepdim=True)
        rows_w = rows_w * (self.row_budget / total.clamp_min(self.row_budget))
        self.targets[pre] = rows_t
        self.weights[pre] = rows_w
        return float((rows_w - old_w).abs().sum())

    # -- persistence --------------------------------------------------------------------
    def settings(self) -> dict:
        return {
            "cells_per_column": self.C,
            "synapses_per_cell": self.S,
            "learning_rate": self.lr,
            "hebbian_strength": self.hebbian_strength,
            "depression": self.depression,
            "stdp_ltd": self.stdp_ltd,
            "decay": self.decay,
            "w_max": self.w_max,
            "threshold": self.threshold,
            "k_winners": self.k_winners,
            "row_budget": self.row_budget,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        empty = torch.zeros(0, dtype=torch.long)
        return {
            "targets": self.targets.to(torch.int32).clone(),
            "weights": self.weights.clone(),
            "usage": self.usage.clone(),
            "alive": self.alive.clone(),
            "active": self.active.clone() if self.active is not None else empty,
            "winners": self.winners.clone() if self.winners is not None else empty,
            "rng": self.generator.get_state(),
            "counters": torch.tensor([self.learning_steps, self.abs_change, self.last_abs_change], dtype=torch.float64),
        }

    def load_state_tensors(self, st: dict[str, torch.Tensor]) -> None:
        self.targets = st["targets"].to(torch.long).clone()
        self.weights = st["weights"].float().clone()
        self.usage = st["usage"].float().clone()
        self.alive = st["alive"].to(torch.bool).clone()
        self.n_units = int(self.alive.numel())
        self.generator.set_state(st["rng"])
        c = st["counters"].tolist()
        self.learning_steps, self.abs_change, self.last_abs_change = int(c[0]), float(c[1]), float(c[2])
        if st["active"].numel():
            self.active = st["active"].to(torch.long).clone()
            self.winners = st["winners"].to(torch.long).clone()
            self.drive = self._compute_drive(self.active)
        else:
            self.reset()
