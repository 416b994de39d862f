"""A normalised next-unit distribution for the Hebbian network, calibrated on training data.

The network has drives, not probabilities. For val/loss and val/bpb to compare with other
architectures they must be the negative log-likelihood of a proper distribution over the
live units, whose free parameters are set without looking at validation data:

    p(u) = (1 - eps) * softmax(gain * score / w_max)[u] + eps / n_live

``score`` is :meth:`ColumnNetwork.unit_scores`. ``gain`` (an inverse temperature) and
``eps`` (a floor for units the network does not predict) are fitted by grid search to minimise
the NLL of *prequential* training positions: while learning, every ``calibrate_every``-th
text is scored unit by unit *before* each unit is learned (the way a held-out text would be),
and those positions are kept in a ring buffer. Only the nonzero scores of a position are
stored; the zeros contribute ``exp(0)`` each to the partition function.
"""
from __future__ import annotations

import math

import torch

DEFAULT_GAIN = 8.0
DEFAULT_EPS = 0.02
GAIN_GRID = torch.logspace(math.log10(0.25), math.log10(64.0), 17, dtype=torch.float64)
EPS_GRID = torch.tensor([1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.2, 0.4], dtype=torch.float64)


def unit_probability(scores: torch.Tensor, target: int, alive: torch.Tensor, w_max: float, gain: float,
                     eps: float) -> float:
    """p(target) under the read-out, for one position (``scores`` over all unit ids)."""
    n_live = max(1, int(alive.sum()))
    logits = (scores.double() * (gain / w_max)).masked_fill(~alive, float("-inf"))
    return (1 - eps) * float(logits.softmax(-1)[target]) + eps / n_live


class ReadoutCalibration:
    """Ring buffer of prequential positions and the (gain, eps) fitted to them."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = int(capacity)
        self.values: list[torch.Tensor] = []  # nonzero live scores of each position (/ w_max)
        self.target_score: list[float] = []
        self.n_live: list[int] = []
        self.next_slot = 0
        self.gain, self.eps = DEFAULT_GAIN, DEFAULT_EPS
        self.dirty = False

    def __len__(self) -> int:
        return len(self.values)

    def add(self, scores: torch.Tensor, target: int, alive: torch.Tensor, w_max: float) -> None:
        live = scores[alive] / w_max
        row = (live[live > 0].float().clone(), float(scores[target]) / w_max if bool(alive[target]) else 0.0,
               int(alive.sum()))
        if len(self.values) < self.capacity:
            self.values.append(row[0])
            self.target_score.append(row[1])
            self.n_live.append(row[2])
        else:
            i = self.next_slot
            self.values[i], self.target_score[i], self.n_live[i] = row
            self.next_slot = (i + 1) % self.capacity
        self.dirty = True

    def mean_nll(self, gains: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Mean NLL (nats) of the buffer for every (gain, eps) pair: ``[len(gains), len(eps)]``."""
        P = len(self.values)
        width = max(1, max(v.numel() for v in self.values))
        vals = torch.zeros(P, width, dtype=torch.float64)
        mask = torch.zeros(P, width, dtype=torch.bool)
        for i, v in enumerate(self.values):
            vals[i, : v.numel()] = v.double()
            mask[i, : v.numel()] = True
        n_live = torch.tensor(self.n_live, dtype=torch.float64)
        n_zero = (n_live - mask.sum(1)).clamp_min(0)
        s_t = torch.tensor(self.target_score, dtype=torch.float64)
        out = torch.empty(len(gains), len(eps), dtype=torch.float64)
        for gi, g in enumerate(gains.tolist()):
            z = (vals * g).masked_fill(~mask, float("-inf"))
            # log partition: the stored nonzero scores plus exp(0) = 1 for every zero-scored live unit
            log_z = torch.logaddexp(torch.logsumexp(z, 1), torch.log(n_zero))
            p_soft = torch.exp(s_t * g - log_z)
            p = (1 - eps)[None, :] * p_soft[:, None] + eps[None, :] / n_live[:, None]
            out[gi] = -torch.log(p.clamp_min(1e-300)).mean(0)
        return out

    def fit(self) -> tuple[float, float]:
        """(gain, eps) of least prequential NLL on the grid; the defaults until there is data."""
        if self.dirty and len(self.values) >= 16:
            nll = self.mean_nll(GAIN_GRID, EPS_GRID)
            best = int(nll.argmin())
            self.gain = float(GAIN_GRID[best // len(EPS_GRID)])
            self.eps = float(EPS_GRID[best % len(EPS_GRID)])
        self.dirty = False
        return self.gain, self.eps

    # -- persistence (tensors only) ---------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        lengths = [v.numel() for v in self.values]
        return {
            "values": torch.cat(self.values) if self.values else torch.zeros(0),
            "lengths": torch.tensor(lengths, dtype=torch.int64),
            "target_score": torch.tensor(self.target_score, dtype=torch.float64),
            "n_live": torch.tensor(self.n_live, dtype=torch.int64),
            "meta": torch.tensor([self.capacity, self.next_slot, int(self.dirty)], dtype=torch.int64),
            "params": torch.tensor([self.gain, self.eps], dtype=torch.float64),
        }

    def load_state_tensors(self, st: dict[str, torch.Tensor]) -> None:
        lengths = st["lengths"].tolist()
        self.values = list(torch.split(st["values"].float(), lengths)) if lengths else []
        self.values = [v.clone() for v in self.values]
        self.target_score = st["target_score"].tolist()
        self.n_live = [int(x) for x in st["n_live"].tolist()]
        self.capacity, self.next_slot, dirty = (int(x) for x in st["meta"].tolist())
        self.dirty = bool(dirty)
        self.gain, self.eps = (float(x) for x in st["params"].tolist())
