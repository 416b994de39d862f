"""Token -> SDR encoder.

Each token id maps to a fixed set of ``active_bits`` indices out of ``size`` bits. The
choice is deterministic per (seed, token) and uses private ``numpy.random.Generator``
objects seeded from a BLAKE2 hash, so encoding never touches numpy's or torch's global
random state.

Optional overlap: when the token texts are given and ``overlap > 0``, a fraction of each
token's bits is drawn from its character n-grams (``#`` marks the word boundary), each
n-gram owning its own deterministic bit pattern. Tokens that share n-grams therefore
share bits ("the" and "then" share the bits of "#th", "the"); the rest of the bits are
token-specific, so distinct tokens stay distinct.
"""
from __future__ import annotations

import hashlib

import numpy as np

from memlm.core.errors import MemLMError


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def char_ngrams(text: str, n: int) -> list[str]:
    """Boundary-marked character n-grams of ``text`` (the whole marked text if shorter)."""
    marked = f"#{text}#"
    if len(marked) <= n:
        return [marked]
    return [marked[i : i + n] for i in range(len(marked) - n + 1)]


class TokenEncoder:
    """Deterministic token -> sparse distributed representation.

    Args:
        size: number of bits of the SDR.
        active_bits: number of active bits per token.
        seed: seed of the bit patterns (same seed, same token -> same SDR).
        overlap: fraction of the active bits drawn from the token's character n-grams
            (0 = random, unrelated SDRs per token).
        ngram: n-gram length used for the overlapping part.
    """

    def __init__(self, size: int = 1024, active_bits: int = 21, seed: int = 42, overlap: float = 0.0, ngram: int = 3):
        if not 0 < active_bits <= size:
            raise MemLMError(f"encoder active_bits={active_bits} must be in 1..size={size}; lower active_bits")
        if not 0.0 <= overlap <= 1.0:
            raise MemLMError(f"encoder overlap={overlap} must be in [0, 1]")
        self.size = int(size)
        self.active_bits = int(active_bits)
        self.seed = int(seed)
        self.overlap = float(overlap)
        self.ngram = int(ngram)

    def encode(self, token_id: int, text: str | None = None) -> np.ndarray:
        """Sorted int32 indices of the active bits of ``token_id`` (``text`` enables overlap)."""
        chosen: list[int] = []
        taken = np.zeros(self.size, dtype=bool)
        n_shared = int(round(self.overlap * self.active_bits)) if text else 0
        if n_shared:
            grams = char_ngrams(text, self.ngram)
            # each n-gram proposes its own bit order; take them round-robin
            orders = [_rng(self.seed, "g:" + g).permutation(self.size) for g in grams]
            pos = [0] * len(orders)
            while len(chosen) < n_shared:
                for k, order in enumerate(orders):
                    if len(chosen) >= n_shared:
                        break
                    while pos[k] < self.size and taken[order[pos[k]]]:
                        pos[k] += 1
                    if pos[k] < self.size:
                        taken[order[pos[k]]] = True
                        chosen.append(int(order[pos[k]]))
        key = f"t:{token_id}" if text is None else f"t:{token_id}:{text}"
        for bit in _rng(self.seed, key).permutation(self.size):
            if len(chosen) >= self.active_bits:
                break
            if not taken[bit]:
                taken[bit] = True
                chosen.append(int(bit))
        return np.sort(np.asarray(chosen, dtype=np.int32))

    def table(self, vocab_size: int, texts: list[str] | None = None) -> np.ndarray:
        """int32 [vocab_size, active_bits]: the SDR of every token id (row = sorted indices)."""
        out = np.empty((vocab_size, self.active_bits), dtype=np.int32)
        for i in range(vocab_size):
            out[i] = self.encode(i, texts[i] if texts is not None and i < len(texts) else None)
        return out

    def dense(self, token_id: int, text: str | None = None) -> np.ndarray:
        v = np.zeros(self.size, dtype=np.uint8)
        v[self.encode(token_id, text)] = 1
        return v
