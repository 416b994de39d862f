"""Episodic store: a fixed-size ring buffer of recent segment summaries.

Each entry is one processed segment: a pooled hidden state (``pooled``, ``[hidden_dim]``) used
as the retrieval key and read value, the token span ``(start, end)`` it covered, the model's
loss on it (``surprise``) and how often it was retrieved (``hits``): what consolidation into
semantic memory ranks by. Optionally the SSM state after the segment (``ssm_state``, any fixed
shape, given as ``state_dim`` = an int or a shape tuple); ``state_dim=None`` keeps none. HMST
keeps none: its SSM state already travels exactly from segment to segment in the carried
stream state (and the checkpoint), nothing resumes a stream from an older episode, and a
stored copy cost ``d_inner x d_state`` floats per entry that no read ever used.
With ``token_len > 0`` each entry also keeps the segment's token ids (``tokens``, -1 padded):
what consolidation replays to write the episode's content into semantic memory.
When full, the oldest entry is overwritten. Everything is a preallocated tensor on one
device (``.to(device)`` moves it), writes are detached ``index_copy_`` calls, and retrieval is
one cosine-similarity matmul plus ``topk``; nothing loops over entries in Python.

Indices returned by :meth:`add`, :meth:`add_batch` and :meth:`retrieve` are ring-buffer slots:
they stay valid until ``capacity`` newer entries have been written. :meth:`get` returns a
``step`` per slot (the global write counter) so a caller can detect overwritten slots.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from memlm.core.errors import MemLMError


class EpisodicStore:
    """Ring buffer of (ssm_state, pooled, span). See the module docstring."""

    def __init__(self, capacity: int, state_dim: int | Sequence[int] | None, hidden_dim: int, device="cpu", dtype=torch.float32,
                 token_len: int = 0):
        if capacity <= 0:
            raise MemLMError(f"episodic store capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        if state_dim is None:
            self.state_shape = None
        else:
            self.state_shape = (int(state_dim),) if isinstance(state_dim, int) else tuple(int(s) for s in state_dim)
        self.state_dim = state_dim
        self.hidden_dim = int(hidden_dim)
        if token_len < 0:
            raise MemLMError(f"episodic token_len must be >= 0, got {token_len}")
        self.token_len = int(token_len)
        self.device = torch.device(device)
        self.dtype = dtype
        self.clear()

    def clear(self) -> None:
        cap, dev = self.capacity, self.device
        self.ssm_state = None if self.state_shape is None else torch.zeros((cap, *self.state_shape), dtype=self.dtype, device=dev)
        self.surprise = torch.zeros(cap, dtype=torch.float32, device=dev)
        self.hits = torch.zeros(cap, dtype=torch.float32, device=dev)
        self.pooled = torch.zeros((cap, self.hidden_dim), dtype=self.dtype, device=dev)
        self.span = torch.zeros((cap, 2), dtype=torch.long, device=dev)
        self.step = torch.full((cap,), -1, dtype=torch.long, device=dev)  # global write counter per slot
        self.tokens = torch.full((cap, self.token_len), -1, dtype=torch.long, device=dev) if self.token_len else None
        self._written = 0  # total entries ever written

    def to(self, device) -> "EpisodicStore":
        self.device = torch.device(device)
        for name in ("ssm_state", "pooled", "span", "step", "surprise", "hits", "tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(self.device))
        return self

    def __len__(self) -> int:
        return min(self._written, self.capacity)

    @property
    def written(self) -> int:
        """Total entries ever written (monotonic)."""
        return self._written

    def occupancy(self) -> float:
        return len(self) / self.capacity

    # ------------------------------------------------------------------ write
    def add(self, ssm_state: torch.Tensor | None, pooled: torch.Tensor, span: tuple[int, int]) -> int:
        """Write one entry; returns its slot."""
        slots = self.add_batch(None if ssm_state is None else ssm_state.unsqueeze(0), pooled.unsqueeze(0), [tuple(span)])
        return int(slots[-1])

    def add_batch(self, ssm_states: torch.Tensor | None, pooled: torch.Tensor, spans, surprise=None,
                  tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Write N entries in order (the last one is the newest); returns their slots [N].

        ``tokens`` [N, L] (kept only when the store has ``token_len``; cut or -1 padded to it).

        ``ssm_states``: [N, *state_shape] (or [N, prod(state_shape)]); ``pooled``: [N, hidden_dim];
        ``spans``: LongTensor [N, 2] or a list of (start, end). If N > capacity only the last
        ``capacity`` entries survive (the returned slots of earlier ones are already overwritten).
        """
        n = pooled.shape[0]
        if pooled.dim() != 2 or pooled.shape[1] != self.hidden_dim:
            raise MemLMError(f"episodic pooled must be [N, {self.hidden_dim}], got {tuple(pooled.shape)}")
        if self.ssm_state is not None:
            per_state = self.ssm_state[0].numel()
            if ssm_states is None or ssm_states.dim() == 0 or ssm_states.shape[0] != n or ssm_states.numel() != n * per_state:
                got = None if ssm_states is None else tuple(ssm_states.shape)
                raise MemLMError(f"episodic ssm_state must be [N, {self.state_shape}], got {got}")
        spans = torch.as_tensor(spans, dtype=torch.long).reshape(n, 2).to(self.device)
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        steps = torch.arange(self._written, self._written + n, device=self.device)
        slots = steps % self.capacity
        keep = slice(max(0, n - self.capacity), n)  # index_copy_ with duplicate slots is undefined: drop overwritten
        idx = slots[keep]
        if self.ssm_state is not None:
            self.ssm_state.index_copy_(0, idx, ssm_states[keep].detach().reshape(-1, *self.state_shape).to(self.device, self.dtype))
        sur = torch.zeros(n) if surprise is None else torch.as_tensor(surprise, dtype=torch.float32).reshape(n)
        self.surprise.index_copy_(0, idx, sur[keep].detach().to(self.device, torch.float32))
        self.hits.index_fill_(0, idx, 0.0)
        self.pooled.index_copy_(0, idx, pooled[keep].detach().to(self.device, self.dtype))
        self.span.index_copy_(0, idx, spans[keep])
        self.step.index_copy_(0, idx, steps[keep])
        if self.tokens is not None:
            tok = torch.full((n, self.token_len), -1, dtype=torch.long, device=self.device)
            if tokens is not None:
                t = torch.as_tensor(tokens).reshape(n, -1)[:, : self.token_len].to(self.device, torch.long)
                tok[:, : t.size(1)] = t
            self.tokens.index_copy_(0, idx, tok[keep])
        self._written += n
        return slots

    # ------------------------------------------------------------------ read
    def retrieve(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k entries by cosine(query, pooled).

        ``query`` is [hidden_dim] (returns scores[k'], indices[k']) or [B, hidden_dim] (returns
        [B, k']), with k' = min(k, len(self)); best first. Indices are slots for :meth:`get`.
        """
        if query.shape[-1] != self.hidden_dim or query.dim() not in (1, 2):
            raise MemLMError(f"episodic query must be [{self.hidden_dim}] or [B, {self.hidden_dim}], got {tuple(query.shape)}")
        n = len(self)
        kk = min(int(k), n)
        q = F.normalize(query.detach().to(self.device, self.dtype), dim=-1)
        if kk <= 0:
            shape = (0,) if query.dim() == 1 else (query.shape[0], 0)
            return torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=torch.long, device=self.device)
        keys = F.normalize(self.pooled[:n], dim=-1)  # slots 0..n-1 are the filled ones
        sims = q @ keys.T
        return sims.topk(kk, dim=-1)

    def record_hits(self, slots: torch.Tensor) -> None:
        """Count a retrieval of each slot (the frequency term of consolidation's importance)."""
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device).reshape(-1)
        self.hits.index_add_(0, idx, torch.ones(idx.numel(), device=self.device))

    def get(self, indices) -> dict:
        """Entries at the given slots: dict(pooled, span, step, surprise, hits[, ssm_state]), indexed like ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise MemLMError(f"episodic slot out of range (store holds {len(self)} entries)")
        out = {"pooled": self.pooled[idx], "span": self.span[idx], "step": self.step[idx],
               "surprise": self.surprise[idx], "hits": self.hits[idx]}
        if self.ssm_state is not None:
            out["ssm_state"] = self.ssm_state[idx]
        if self.tokens is not None:
            out["tokens"] = self.tokens[idx]
        return out

    def latest(self, n: int = 1) -> torch.Tensor:
        """Slots of the newest min(n, len) entries, oldest first."""
        n = min(int(n), len(self))
        steps = torch.arange(self._written - n, self._written, device=self.device)
        return steps % self.capacity

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        out = {
            "pooled": self.pooled.detach().cpu().clone(),
            "span": self.span.cpu().clone(),
            "step": self.step.cpu().clone(),
            "written": torch.tensor(self._written, dtype=torch.long),
            "surprise": self.surprise.cpu().clone(),
            "hits": self.hits.cpu().clone(),
        }
        if self.ssm_state is not None:
            out["ssm_state"] = self.ssm_state.detach().cpu().clone()
        if self.tokens is not None:
            out["tokens"] = self.tokens.cpu().clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint from before the store dropped ssm_state still loads (the saved states are ignored)
        mine = None if self.ssm_state is None else tuple(self.ssm_state.shape)
        theirs = tuple(state["ssm_state"].shape) if "ssm_state" in state and mine is not None else mine
        if theirs != mine or tuple(state["pooled"].shape) != tuple(self.pooled.shape):
            raise MemLMError(
                f"episodic checkpoint shapes {theirs}/{tuple(state['pooled'].shape)} do not match "
                f"this store {mine}/{tuple(self.pooled.shape)}; use the same capacity and dims"
            )
        if self.ssm_state is not None:
            self.ssm_state = state["ssm_state"].to(self.device, self.dtype).clone()
        cap = self.capacity
        self.surprise = state.get("surprise", torch.zeros(cap)).to(self.device, torch.float32).clone()
        self.hits = state.get("hits", torch.zeros(cap)).to(self.device, torch.float32).clone()
        self.pooled = state["pooled"].to(self.device, self.dtype).clone()
        self.span = state["span"].to(self.device, torch.long).clone()
        self.step = state["step"].to(self.device, torch.long).clone()
        self._written = int(state["written"])
        if self.tokens is not None:  # a store saved without tokens (or with other lengths): none kept
            saved = state.get("tokens")
            ok = saved is not None and tuple(saved.shape) == tuple(self.tokens.shape)
            self.tokens = saved.to(self.device, torch.long).clone() if ok else torch.full_like(self.tokens, -1)
