"""Truncated BPTT state carrying for stateful models (HAMT, any ``LanguageModel.stateful``).

The base ``LanguageModel.training_step`` passes ``pl_module.carried_state`` into the model and
stores the detached new state after every step. This callback owns the *policy*:

- reset at every training epoch start (unless the state was just restored from a checkpoint);
- reset when a batch says ``first`` (first chunk of a set of streams) or is not a stream batch
  (random windows are unrelated, so carrying would leak across them);
- reset when the batch size changes (a short final batch);
- ``carry=False`` resets before every batch (ablation: no memory across chunks);
- gradient accumulation needs nothing special: consecutive micro-batches are consecutive chunks, the
  state flows through them (detached at each micro-batch boundary, i.e. truncation = one chunk);
- checkpoints: the state of *every rank* is gathered (``all_gather`` in DDP, on all ranks while the
  checkpoint is being dumped) and saved as tensors under ``checkpoint["tbptt"]``. On load each rank
  takes its own slice when the world size matches; otherwise the state is reset with a warning,
  because stream ownership changes with the number of ranks.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

CKPT_KEY = "tbptt"


def _flatten(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if state is None:
        return out
    if isinstance(state, torch.Tensor):
        out[prefix] = state
    elif isinstance(state, dict):
        for k, v in state.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def _structure(state: Any) -> Any:
    """JSON-like skeleton of the nested state (dict/list, tensors as None)."""
    if isinstance(state, torch.Tensor) or state is None:
        return None
    if isinstance(state, dict):
        return {k: _structure(v) for k, v in state.items()}
    return [_structure(v) for v in state]


def _rebuild(skeleton: Any, flat: dict[str, torch.Tensor], prefix: str = "") -> Any:
    if skeleton is None:
        return flat.get(prefix)
    if isinstance(skeleton, dict):
        return {k: _rebuild(v, flat, f"{prefix}.{k}" if prefix else str(k)) for k, v in skeleton.items()}
    return [_rebuild(v, flat, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(skeleton)]


def _batch_dim(state: Any) -> int | None:
    for t in _flatten(state).values():
        if t.ndim >= 2:
            return int(t.shape[0])
    return None


class TBPTT(L.Callback):
    """Carry / reset / checkpoint the recurrent training state of a stateful LanguageModel."""

    def __init__(self, carry: bool = True, save_state: bool = True) -> None:
        self.carry = carry
        self.save_state = save_state
        self._restored = False
        self.resets = 0  # how many times the state was reset (for tests and logs)

    @property
    def state_key(self) -> str:
        return f"TBPTT{{carry={self.carry}}}"

    def _reset(self, pl_module) -> None:
        pl_module.carried_state = None
        self.resets += 1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._restored:
            self._restored = False  # resuming mid-stream: keep the restored state
            return
        self._reset(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not getattr(pl_module, "stateful", False):
            return
        is_stream = isinstance(batch, dict) and bool(batch.get("stream", False))
        first = isinstance(batch, dict) and bool(batch.get("first", False))
        if not self.carry or not is_stream or first:
            self._reset(pl_module)
            return
        state = pl_module.carried_state
        if state is not None:
            bd = _batch_dim(state)
            if bd is not None and bd != batch["input_ids"].shape[0]:
                self._reset(pl_module)

    # -- checkpoints ------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not self.save_state:
            return
        state = getattr(pl_module, "carried_state", None)
        world = trainer.world_size
        has = torch.tensor([0 if state is None else 1], device=pl_module.device)
        if world > 1:
            has = trainer.strategy.reduce(has, reduce_op="min")
        if state is None or int(has.item()) == 0:
            checkpoint[CKPT_KEY] = {"world_size": world, "has_state": False, "skeleton": None, "tensors": {}}
            return
        flat = _flatten(state)
        gathered = {}
        for k, t in flat.items():
            g = trainer.strategy.all_gather(t.contiguous()) if world > 1 else t.unsqueeze(0)
            gathered[k] = g.detach().cpu()  # [world, ...]
        checkpoint[CKPT_KEY] = {
            "world_size": world, "has_state": True, "skeleton": _structure(state), "tensors": gathered
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        payload = checkpoint.get(CKPT_KEY)
        if not payload or not payload.get("has_state"):
            return
        world, rank = trainer.world_size, trainer.global_rank
        if int(payload["world_size"]) != world:
            rank_zero_warn(
                f"TBPTT state was saved with {payload['world_size']} ranks, resuming with {world}: "
                "streams are re-sharded, so the carried memory state is reset"
            )
            return
        flat = {k: v[rank].to(pl_module.device) for k, v in payload["tensors"].items()}
        pl_module.carried_state = _rebuild(payload["skeleton"], flat)
        self._restored = True
