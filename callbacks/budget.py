"""Train for a wall-clock budget instead of a step count.

``WallClockBudget(minutes=10)`` stops training once the budget is spent and, for modules
with a learning-rate schedule (:class:`~memlm.lightning_modules.language_model.LanguageModel`),
drives the cosine decay by the fraction of the budget spent, so every run ends at the floor
learning rate however many steps this machine managed. That is what makes runs of different
architectures comparable "at equal budget" (``bench/leaderboard.py``). Time spent in
validation counts, as it does for Lightning's ``max_time``.

``snapshots=N`` also writes ``budget-<k>of<N>.ckpt`` into ``snapshot_dir`` when k/N of the budget
is spent, so a curve of held-out quality against wall time can be measured afterwards, on the
full validation split, without evaluation time inside the budget.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L

from memlm.core.errors import MemLMError


class WallClockBudget(L.Callback):
    def __init__(self, minutes: float, snapshots: int = 0, snapshot_dir: str | None = None) -> None:
        if not float(minutes) > 0:
            raise MemLMError(f"WallClockBudget minutes must be > 0, got {minutes}")
        if snapshots and not snapshot_dir:
            raise MemLMError("WallClockBudget snapshots need a snapshot_dir to write them into")
        self.budget_s = float(minutes) * 60.0
        self.snapshots, self.snapshot_dir = int(snapshots), snapshot_dir
        self._t0: float | None = None
        self._written = 0
        self.elapsed_at: dict[str, float] = {}  # snapshot file -> seconds of training behind it

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._set_progress(pl_module, 0.0)

    @staticmethod
    def _set_progress(pl_module, fraction: float) -> None:
        if hasattr(pl_module, "schedule_progress"):
            pl_module.schedule_progress = fraction

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fraction = (time.perf_counter() - self._t0) / self.budget_s
        # the scheduler steps after this hook, so the next step's learning rate sees this fraction
        self._set_progress(pl_module, fraction)
        while self.snapshots and self._written < self.snapshots and fraction >= (self._written + 1) / self.snapshots:
            self._written += 1
            path = Path(self.snapshot_dir) / f"budget-{self._written}of{self.snapshots}.ckpt"
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(path))
            self.elapsed_at[path.name] = time.perf_counter() - self._t0
            (path.parent / "budget_elapsed.json").write_text(json.dumps(self.elapsed_at))
        if fraction >= 1.0:
            trainer.should_stop = True
