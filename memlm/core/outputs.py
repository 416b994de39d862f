"""What every MemLM model returns, and the helper that cuts a carried state from its graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelOutput:
    """What every MemLM ``nn.Module`` returns."""

    logits: torch.Tensor  # [B, T, V]
    state: Any = None  # carried to the next call (KV cache, recurrent memory, ...)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # added to the loss, logged as aux/<k>
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as mem/<k> (or the key as given if it has '/')
    hidden: torch.Tensor | None = None  # [B, T, D] final hidden states (for embeddings)


def detach_state(state: Any) -> Any:
    """Detach every tensor in a nested state (truncated BPTT)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(v) for v in state)
    if hasattr(state, "detach"):
        return state.detach()
    return state
