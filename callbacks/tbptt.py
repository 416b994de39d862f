"""Truncated BPTT state carrying for every stateful model (HAMT, HMST, HTM, Hebbian).

The module implements :class:`memlm.core.state.RecurrentState`: it keeps
``pl_module.carried_state`` between training steps (detached by its ``detach_state``), and this
callback owns the *policy*, through that protocol only (no per-architecture branches):

- reset at every training epoch start (unless the state was just restored from a checkpoint);
- reset when a batch says ``first`` (first chunk of a set of streams) or is not a stream batch
  (random windows are unrelated, so carrying would leak across them);
- reset when the batch size changes (a short final batch);
- ``batch["reset"]`` (optional bool [B]): those rows start a new stream or document in this chunk,
  so only they are re-initialised (``reset_rows``), the other rows keep their memory;
- ``carry=False`` resets before every batch (ablation: no memory across chunks);
- gradient accumulation needs nothing special: consecutive micro-batches are consecutive chunks, the
  state flows through them (detached at each micro-batch boundary, i.e. truncation = one chunk);
- checkpoints: ``state_to_dict`` of *every rank* is gathered (``all_gather`` in DDP, on all ranks
  while the checkpoint is being dumped) and saved as tensors under ``checkpoint["tbptt"]``, each
  tensor stacked over ranks (index = global rank). On load each rank takes its own slice when the
  world size matches and rebuilds the state with ``state_from_dict``; otherwise the state is reset
  with a warning, because stream ownership changes with the number of ranks.

"Reset" of all rows means ``carried_state = None``: the model starts from its initial state.
"""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from memlm.core.state import RecurrentState

CKPT_KEY = "tbptt"


def default_tbptt(module, carry: bool = True) -> list:
    """``configure_callbacks`` of a stateful module: a TBPTT callback unless the trainer has one."""
    trainer = module._trainer
    if trainer is not None and any(isinstance(cb, TBPTT) for cb in trainer.callbacks):
        return []
    return [TBPTT(carry=carry)]


class TBPTT(L.Callback):
    """Carry / reset / checkpoint the recurrent training state of a :class:`RecurrentState` module."""

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
        if not isinstance(pl_module, RecurrentState):
            return
        if self._restored:
            self._restored = False  # resuming mid-stream: keep the restored state
            return
        self._reset(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not isinstance(pl_module, RecurrentState):
            return
        is_stream = isinstance(batch, dict) and bool(batch.get("stream", False))
        first = isinstance(batch, dict) and bool(batch.get("first", False))
        if not self.carry or not is_stream or first:
            self._reset(pl_module)
            return
        state = pl_module.carried_state
        if state is None:
            return
        rows = pl_module.state_batch_size(state)
        if rows is not None and rows != batch["input_ids"].shape[0]:
            self._reset(pl_module)
            return
        mask = batch.get("reset")
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if bool(mask.all()):
                self._reset(pl_module)
            elif bool(mask.any()):
                pl_module.carried_state = pl_module.reset_rows(state, mask)

    # -- checkpoints ------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not self.save_state or not isinstance(pl_module, RecurrentState):
            return
        state = pl_module.carried_state
        world = trainer.world_size
        has = torch.tensor([0 if state is None else 1], device=pl_module.device)
        if world > 1:
            has = trainer.strategy.reduce(has, reduce_op="min")
        if state is None or int(has.item()) == 0:
            checkpoint[CKPT_KEY] = {"world_size": world, "has_state": False, "tensors": {}}
            return
        gathered = {}
        for key, t in pl_module.state_to_dict(state).items():
            if world > 1:  # every rank holds the same keys and shapes (the protocol's DDP rule)
                t = trainer.strategy.all_gather(t.to(pl_module.device).contiguous())
            else:
                t = t.unsqueeze(0)
            gathered[key] = t.detach().cpu()  # [world, ...]
        checkpoint[CKPT_KEY] = {"world_size": world, "has_state": True, "tensors": gathered}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not isinstance(pl_module, RecurrentState):
            return
        payload = checkpoint.get(CKPT_KEY)
        if not payload:
            # a checkpoint from before the protocol: keep what the module restored itself (HTM
            # kept its stream context in htm_state), the hooks of the module run first
            self._restored = pl_module.carried_state is not None
            return
        if not payload.get("has_state"):
            return
        world, rank = trainer.world_size, trainer.global_rank
        if int(payload["world_size"]) != world:
            rank_zero_warn(
                f"TBPTT state was saved with {payload['world_size']} ranks, resuming with {world}: "
                "streams are re-sharded, so the carried memory state is reset"
            )
            return
        own = {k: v[rank].to(pl_module.device) for k, v in payload["tensors"].items()}
        pl_module.carried_state = pl_module.state_from_dict(own)
        self._restored = True
