"""``last.ckpt`` must always hold the newest state, including when training stops between
validations (``max_steps`` not a multiple of ``val_check_interval``).

The final save happens in ``on_train_batch_end`` of the last step — the same loop state as
periodic saves — so ``fit --ckpt_path last`` continues exactly (data position included).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L


class FinalLastCheckpoint(L.Callback):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: resume needs the optimizer
