"""Softmax SDR classifier: active cells at step t -> distribution over the token at t+1.

Like htm.core's ``Classifier``: one weight row per input bit (plus an always-on bias row),
logits = sum of the rows of the active bits, p = softmax(logits), and online learning
``W[bit] += alpha / n * (onehot(target) - p)`` for each of the n active bits (bias
included) after each prediction. htm.core uses ``alpha`` per bit; dividing by n makes the
change of the logits ``alpha`` whatever the number of active cells (a bursting column
activates all its cells, so n varies 10-30x between predicted and surprising input).
Predictions are made before the update (prequential), so training accuracy is honest.

The reported probability is floored: ``p' = (p + floor) / (1 + V * floor)``, so the
negative log-likelihood stays finite even for a token never seen after a context.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from memlm.core.errors import MemLMError


@njit(cache=True)
def _clf_run(bits_flat, bits_off, targets, weights, alpha, learn, floor, out_nll, out_pred, out_logp):
    """Predict (and learn) over T steps; out_logp [T or 0, V] receives log p' when non-empty."""
    n_bits, n_cls = weights.shape
    bias = n_bits - 1
    logits = np.empty(n_cls, dtype=np.float64)
    prob = np.empty(n_cls, dtype=np.float64)
    keep = out_logp.shape[0] > 0
    norm = 1.0 + n_cls * floor
    for t in range(len(bits_off) - 1):
        for k in range(n_cls):
            logits[k] = weights[bias, k]
        for i in range(bits_off[t], bits_off[t + 1]):
            row = weights[bits_flat[i]]
            for k in range(n_cls):
                logits[k] += row[k]
        mx = logits[0]
        arg = 0
        for k in range(1, n_cls):
            if logits[k] > mx:
                mx = logits[k]
                arg = k
        tot = 0.0
        for k in range(n_cls):
            prob[k] = math.exp(logits[k] - mx)
            tot += prob[k]
        for k in range(n_cls):
            prob[k] /= tot
        out_pred[t] = arg
        y = targets[t]
        if y >= 0:
            out_nll[t] = -math.log((prob[y] + floor) / norm)
        else:
            out_nll[t] = 0.0
        if keep:
            for k in range(n_cls):
                out_logp[t, k] = math.log((prob[k] + floor) / norm)
        if learn and y >= 0:
            step = alpha / (bits_off[t + 1] - bits_off[t] + 1)  # per pattern: the logit step is alpha
            for k in range(n_cls):
                prob[k] = -step * prob[k]
            prob[y] += step
            for k in range(n_cls):
                weights[bias, k] += prob[k]
            for i in range(bits_off[t], bits_off[t + 1]):
                row = weights[bits_flat[i]]
                for k in range(n_cls):
                    row[k] += prob[k]


class SDRClassifier:
    """Online softmax classifier from a sparse binary input of ``input_size`` bits to ``num_classes``."""

    def __init__(self, input_size: int, num_classes: int, alpha: float = 0.01, prob_floor: float = 1e-5):
        if alpha <= 0:
            raise MemLMError(f"classifier alpha={alpha} must be > 0")
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.alpha = float(alpha)
        self.prob_floor = float(prob_floor)
        self.weights = np.zeros((self.input_size + 1, self.num_classes), dtype=np.float32)  # last row: bias

    def run(self, bits_flat, bits_off, targets, learn: bool = True, want_logp: bool = False):
        """T steps of (predict, then learn from the target). Returns (nll[T], argmax[T], logp[T,V] or None).

        ``targets[t] < 0`` means unknown: the step predicts but neither learns nor scores."""
        bits_flat = np.ascontiguousarray(bits_flat, dtype=np.int32)
        bits_off = np.ascontiguousarray(bits_off, dtype=np.int64)
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        n = len(bits_off) - 1
        nll = np.zeros(n, dtype=np.float64)
        pred = np.zeros(n, dtype=np.int64)
        logp = np.zeros((n if want_logp else 0, self.num_classes), dtype=np.float64)
        _clf_run(bits_flat, bits_off, targets, self.weights, self.alpha, bool(learn), self.prob_floor, nll, pred, logp)
        return nll, pred, (logp if want_logp else None)

    def infer(self, active_bits) -> np.ndarray:
        """Floored probability of every class for one input pattern (no learning)."""
        bits = np.asarray(active_bits, dtype=np.int32)
        _, _, logp = self.run(bits, np.array([0, len(bits)]), np.array([-1]), learn=False, want_logp=True)
        return np.exp(logp[0])

    def learn(self, active_bits, target: int) -> None:
        bits = np.asarray(active_bits, dtype=np.int32)
        self.run(bits, np.array([0, len(bits)]), np.array([int(target)]), learn=True)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights.copy()}

    def load_state_dict(self, state: dict) -> None:
        w = state["weights"]
        w = np.asarray(w.numpy() if hasattr(w, "numpy") else w, dtype=np.float32)
        if w.shape != self.weights.shape:
            raise MemLMError(f"classifier weights have shape {w.shape}, expected {self.weights.shape}; check the config")
        self.weights = np.ascontiguousarray(w)
