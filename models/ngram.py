"""Count-based token n-gram with interpolated Kneser-Ney smoothing: the reference baseline.

Every n-gram of a token sequence (ids < ``vocab_size``) is packed into one int64 key
(``sum(token_i * V**i)``), so counting is ``np.unique`` and look-ups are ``searchsorted``:
fitting a million characters takes seconds and scoring is vectorised over positions.

Order k's probability (interpolated Kneser-Ney, one absolute discount per order,
``D_k = n1 / (n1 + 2 n2)`` from the count-of-counts):

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h) + D_k * N1+(h .) / c_k(h) * P_{k-1}(w | h')

where h' drops the oldest token of h; the highest order counts occurrences, the lower
orders count distinct left extensions (continuation counts); a context never seen falls
through to the lower order; order 0 is uniform over the vocabulary. Each level is a proper
distribution, so the scores are exact log-probabilities (bits per byte are honest).
"""
from __future__ import annotations

import math

import numpy as np

from memlm.core.errors import MemLMError


class KneserNeyNGram:
    """Interpolated Kneser-Ney n-gram of ``order`` tokens (context = order - 1 tokens)."""

    def __init__(self, order: int, vocab_size: int):
        if order < 1:
            raise MemLMError(f"n-gram order={order} must be >= 1")
        if vocab_size < 2 or order * math.log2(vocab_size) > 62:
            raise MemLMError(f"order {order} x vocabulary {vocab_size} does not fit a 62-bit key; lower the order")
        self.order = int(order)
        self.vocab_size = int(vocab_size)
        self.levels: list[dict[str, np.ndarray | float]] = []

    def _keys(self, ids: np.ndarray, k: int) -> np.ndarray:
        """Keys of every k-gram ending at positions k-1..T-1 (token i back from the end weighs V**i)."""
        t = len(ids) - k + 1
        key = np.zeros(max(t, 0), dtype=np.int64)
        for i in range(k):  # i = 0 is the predicted token
            key += ids[k - 1 - i : k - 1 - i + t] * np.int64(self.vocab_size) ** i
        return key

    def fit(self, ids) -> "KneserNeyNGram":
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) < self.order or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise MemLMError(f"n-gram fit needs >= {self.order} token ids in 0..{self.vocab_size - 1}")
        v = np.int64(self.vocab_size)
        self.levels = []
        upper_keys = None
        for k in range(self.order, 0, -1):
            if upper_keys is None:  # highest order: occurrence counts
                keys, counts = np.unique(self._keys(ids, k), return_counts=True)
            else:  # continuation counts: distinct tokens seen before the k-gram
                keys, counts = np.unique(upper_keys % v**k, return_counts=True)
            all_keys = keys
            n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
            d = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5
            ctx = keys // v  # the context part (the predicted token is the lowest digit)
            ctx_keys, start = np.unique(ctx, return_index=True)
            totals = np.add.reduceat(counts, start) if len(counts) else counts
            types = np.diff(np.append(start, len(ctx)))
            self.levels.append({"k": k, "keys": keys, "counts": counts.astype(np.float64), "d": d,
                                "ctx": ctx_keys, "ctx_total": totals.astype(np.float64),
                                "ctx_types": types.astype(np.float64)})
            upper_keys = all_keys
        self.levels.reverse()  # levels[k-1] is order k
        return self

    def log_probs(self, ids, start: int = 0) -> np.ndarray:
        """Natural-log probability of ``ids[t]`` given the tokens before it, for t >= start
        (the first tokens use the shorter contexts available)."""
        if not self.levels:
            raise MemLMError("the n-gram is not fitted; call fit(ids) first")
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise MemLMError(f"token id outside 0..{self.vocab_size - 1}; use the tokenizer the n-gram was fitted with")
        v = np.int64(self.vocab_size)
        pos = np.arange(start, len(ids))
        p = np.full(len(pos), 1.0 / self.vocab_size)
        key = ids[pos].copy()  # the k-gram ending at pos, grown one token back per order
        for k in range(1, self.order + 1):
            lv = self.levels[k - 1]
            if k > 1:
                back = pos - (k - 1)
                ok = back >= 0
                key = np.where(ok, key + np.where(ok, ids[np.maximum(back, 0)], 0) * v ** (k - 1), key)
            else:
                ok = np.ones(len(pos), dtype=bool)
            ctx = key // v
            ci = np.searchsorted(lv["ctx"], ctx)
            ci_c = np.minimum(ci, len(lv["ctx"]) - 1)
            seen = ok & (lv["ctx"][ci_c] == ctx) if len(lv["ctx"]) else np.zeros(len(pos), dtype=bool)
            total = np.where(seen, lv["ctx_total"][ci_c], 1.0)
            types = np.where(seen, lv["ctx_types"][ci_c], 0.0)
            gi = np.searchsorted(lv["keys"], key)
            gi_c = np.minimum(gi, len(lv["keys"]) - 1)
            hit = seen & (lv["keys"][gi_c] == key)
            count = np.where(hit, lv["counts"][gi_c], 0.0)
            d = lv["d"]
            mixed = np.maximum(count - d, 0.0) / total + d * types / total * p
            p = np.where(seen, mixed, p)
        return np.log(p)

    def bits_per_token(self, ids, start: int = 0) -> float:
        return float(-self.log_probs(ids, start).mean() / math.log(2))
