"""Holographic binding: bind an item to a key, unbind it back.

Two methods (selected by ``HAMTConfig.binding``):

- ``elementwise``: ``bind(i, k) = i * k``; with bipolar keys (+1/-1) ``unbind(bind(i, k), k) = i``
  exactly, because ``k * k = 1``.
- ``circular``: circular convolution via the real FFT, ``bind(i, k) = irfft(rfft(i) * rfft(k))``;
  unbinding is circular correlation ``irfft(rfft(b) * conj(rfft(k)))``. For random Gaussian keys with
  elements ~ N(0, 1/D) the inverse is approximate and its error shrinks like 1/sqrt(D); for *unitary*
  keys (every Fourier coefficient of modulus 1, see :func:`unitary`) it is exact.

Positional keys are a deterministic function of (seed, absolute position, dimension): an integer hash,
so they are identical in every forward call, on every device and for positions never seen in
training (generation at 64k tokens needs no 64k-row buffer).
"""
from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27, so products of 32-bit values stay inside int64


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors (values kept in [0, 2**32))."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK
    x = x ^ (x >> 16)
    return x


def _position_bits(positions: torch.Tensor, dim: int, seed: int, stream: int) -> torch.Tensor:
    """Hash of (seed, stream, position, d) for every position and d: int64 [..., dim] in [0, 2**32)."""
    pos = positions.to(torch.long) & _MASK
    d = torch.arange(dim, device=positions.device, dtype=torch.long)
    base = _hash32(pos * 0x27D4EB2 + (seed * 0x165667B + stream * 0x3C6EF37) % (1 << 31))
    return _hash32(base.unsqueeze(-1) + d * 0x9E3779B + 0x7F4A7C1)


def bipolar_keys(positions: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Fixed +1/-1 keys for ``positions`` (any shape of int tensor): float [..., dim]."""
    bits = (_position_bits(positions, dim, seed, 0) >> 11) & 1
    return bits.to(torch.float32) * 2.0 - 1.0


def gaussian_keys(positions: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Fixed keys with elements ~ N(0, 1/dim) (unit expected norm) by Box-Muller on two hashes."""
    u1 = (_position_bits(positions, dim, seed, 1).to(torch.float64) + 0.5) / 2.0**32
    u2 = (_position_bits(positions, dim, seed, 2).to(torch.float64) + 0.5) / 2.0**32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (z / math.sqrt(dim)).to(torch.float32)


def positional_keys(positions: torch.Tensor, dim: int, method: str, seed: int = 0) -> torch.Tensor:
    """The binding key of each absolute position for ``method`` (bipolar or unit Gaussian)."""
    if method == "elementwise":
        return bipolar_keys(positions, dim, seed)
    if method == "circular":
        return gaussian_keys(positions, dim, seed)
    raise ValueError(f"unknown binding method {method!r}")


# -- elementwise ------------------------------------------------------------------------
def bind_elementwise(item: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return item * key


def unbind_elementwise(memory: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`bind_elementwise` when ``key`` is bipolar (k*k = 1)."""
    return memory * key


# -- circular ---------------------------------------------------------------------------
def circular_conv(item: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Circular convolution along the last dim via the real FFT."""
    n = item.size(-1)
    return torch.fft.irfft(torch.fft.rfft(item.float(), dim=-1) * torch.fft.rfft(key.float(), dim=-1), n=n, dim=-1).to(
        item.dtype
    )


def circular_corr(memory: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Circular correlation (approximate inverse of :func:`circular_conv`, exact for unitary keys)."""
    n = memory.size(-1)
    spec = torch.fft.rfft(memory.float(), dim=-1) * torch.conj(torch.fft.rfft(key.float(), dim=-1))
    return torch.fft.irfft(spec, n=n, dim=-1).to(memory.dtype)


def unitary(key: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Project a vector onto the unitary keys: same phases, every Fourier modulus 1.

    Correlation with a unitary key is the exact inverse of convolution with it; by Parseval a
    unitary key has unit norm, so binding with it preserves the item's norm.
    """
    n = key.size(-1)
    spec = torch.fft.rfft(key.float(), dim=-1)
    spec = spec / (spec.abs() + eps)
    return torch.fft.irfft(spec, n=n, dim=-1).to(key.dtype)


def bind(item: torch.Tensor, key: torch.Tensor, method: str) -> torch.Tensor:
    if method == "elementwise":
        return bind_elementwise(item, key)
    if method == "circular":
        return circular_conv(item, key)
    raise ValueError(f"unknown binding method {method!r}")


def unbind_adjoint(probe: torch.Tensor, key: torch.Tensor, method: str) -> torch.Tensor:
    """``a`` such that ``<probe, unbind(M, key)> = <a, M>`` for every M (dot products without unbinding M).

    Elementwise: ``probe * key``. Circular: correlation's adjoint is convolution with the same key.
    """
    if method == "elementwise":
        return probe * key
    if method == "circular":
        return circular_conv(probe, key)
    raise ValueError(f"unknown binding method {method!r}")


def unbind(memory: torch.Tensor, key: torch.Tensor, method: str) -> torch.Tensor:
    if method == "elementwise":
        return unbind_elementwise(memory, key)
    if method == "circular":
        return circular_corr(memory, key)
    raise ValueError(f"unknown binding method {method!r}")
