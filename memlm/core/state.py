"""The one protocol for the recurrent state a model carries between training chunks.

Every stateful MemLM module (HAMT, HMST, HTM, Hebbian) implements :class:`RecurrentState`;
``memlm.callbacks.tbptt.TBPTT`` drives the carry / reset policy and the checkpoint through
it alone, with no per-architecture branches.

Why a structural ``Protocol`` and not a mixin or an ABC: the four modules have different
bases (``LanguageModel`` for the gradient-trained ones, ``MemLMModule`` for the online
learners), their states have nothing in common (nested tensor dicts, a dataclass, numpy
per-stream lists, a network's context), and this layer may not import Lightning. A
Protocol asks for six methods and one attribute without touching any inheritance chain,
and ``isinstance(module, RecurrentState)`` is the whole test the callback needs. The
mechanics most implementations share (nested tensors <-> flat dict, masked row reset,
batch size) are plain functions below.

Conventions of the protocol:

- ``carried_state`` is the training state between steps; ``None`` means "fresh" (the model
  starts from its initial state), which is how the callback resets every row at once;
- ``reset_rows`` re-initialises the per-row memory of the masked rows only; counters the
  whole batch shares (a stream position clock) are left alone;
- ``state_to_dict`` holds tensors only (so ``torch.load(weights_only=True)`` reads it back)
  and, in DDP, the same keys and shapes on every rank, because the callback all-gathers it.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from memlm.core.outputs import detach_state as detach_tensors  # noqa: F401 (the shared detach helper)

StateDict = dict[str, torch.Tensor]


@runtime_checkable
class RecurrentState(Protocol):
    """What a stateful module offers the TBPTT callback and the checkpoint (see the module doc)."""

    carried_state: Any

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Any:
        """A fresh state for ``batch_size`` streams."""

    def detach_state(self, state: Any) -> Any:
        """The same state cut from the autograd graph (truncation point of TBPTT)."""

    def reset_rows(self, state: Any, mask: torch.Tensor) -> Any:
        """The state with the rows where ``mask`` [B] is True re-initialised, the others untouched."""

    def state_batch_size(self, state: Any) -> int | None:
        """How many streams ``state`` holds (None when it cannot tell)."""

    def state_to_dict(self, state: Any) -> StateDict:
        """Flat name -> tensor view of ``state`` (copies, safe to save)."""

    def state_from_dict(self, tensors: StateDict) -> Any:
        """Inverse of :meth:`state_to_dict`."""


def flatten_tensors(state: Any, prefix: str = "") -> StateDict:
    """Nested dicts / lists / tuples of tensors -> ``{"layers.0.M": tensor, ...}`` (None leaves dropped)."""
    out: StateDict = {}
    if state is None:
        return out
    if isinstance(state, torch.Tensor):
        out[prefix] = state
    elif isinstance(state, dict):
        for key, value in state.items():
            key = str(key)
            if "." in key:
                raise ValueError(f"state key {key!r} contains '.', which separates nesting levels")
            out.update(flatten_tensors(value, f"{prefix}.{key}" if prefix else key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            out.update(flatten_tensors(value, f"{prefix}.{i}" if prefix else str(i)))
    else:
        raise TypeError(f"state leaf {prefix or '<root>'} is a {type(state).__name__}; only tensors can be saved")
    return out


def unflatten_tensors(flat: StateDict) -> Any:
    """Inverse of :func:`flatten_tensors`: a level whose keys are 0..n-1 becomes a list."""
    if "" in flat:
        if len(flat) != 1:
            raise ValueError("a flat state with a root tensor cannot have other keys")
        return flat[""]
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"state key {key!r} nests under a tensor")
        if leaf in node:
            raise ValueError(f"state key {key!r} nests under a tensor")
        node[leaf] = value
    return _lists_from_digit_keys(tree)


def _lists_from_digit_keys(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    children = {k: _lists_from_digit_keys(v) for k, v in node.items()}
    if children and all(k.isdigit() for k in children):
        indices = sorted(int(k) for k in children)
        if indices != list(range(len(indices))):
            raise ValueError(f"list indices {indices} are not 0..{len(indices) - 1}")
        return [children[str(i)] for i in indices]
    return children


def row_mask(mask: torch.Tensor | Any, batch_size: int) -> torch.Tensor:
    """``mask`` as a bool tensor of shape [batch_size] (a clear error otherwise)."""
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"reset mask must be bool, got {mask.dtype}")
    if tuple(mask.shape) != (batch_size,):
        raise ValueError(f"reset mask has shape {tuple(mask.shape)}, the state holds {batch_size} rows")
    return mask


def reset_tensor_rows(t: torch.Tensor, mask: torch.Tensor, fresh: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` with its rows (dim 0) where ``mask`` is True replaced by ``fresh`` (zeros by default)."""
    keep = ~mask.to(t.device).view(-1, *([1] * (t.ndim - 1)))
    fresh = torch.zeros_like(t) if fresh is None else fresh.to(t.device, t.dtype)
    return torch.where(keep, t, fresh)


def leading_batch_size(state: Any) -> int | None:
    """Dim 0 of the first tensor with at least two dims (scalars such as a position are shared)."""
    for t in flatten_tensors(state).values():
        if t.ndim >= 2:
            return int(t.shape[0])
    return None


__all__ = [
    "RecurrentState", "StateDict", "detach_tensors", "flatten_tensors", "unflatten_tensors", "row_mask",
    "reset_tensor_rows", "leading_batch_size",
]
