"""Test helper callback for the Slurm suite (loaded by class_path from the job's PYTHONPATH).

It writes one ``attempt-<SLURM_RESTART_COUNT>.json`` per job attempt (the step training
started from and the checkpoint it came from), and on the first attempt holds every rank at
step ``hold_at`` until the requeue signal has reached it, so the requeue checkpoint falls on a
known step (between two validations, hence newer than last.ckpt) whatever the machine's speed.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L

from memlm.callbacks.slurm_requeue import SlurmRequeue


class HoldForRequeue(L.Callback):
    def __init__(self, hold_at: int = 0, timeout_s: float = 180.0) -> None:
        self.hold_at, self.timeout_s = hold_at, timeout_s
        self.attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            record = {"start_step": trainer.global_step, "ckpt_path": trainer.ckpt_path,
                      "job": os.environ.get("SLURM_JOB_ID"), "world": trainer.world_size}
            (Path(trainer.default_root_dir) / f"attempt-{self.attempt}.json").write_text(json.dumps(record))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.hold_at or self.attempt != 0 or trainer.global_step != self.hold_at:
            return
        requeue = next(cb for cb in trainer.callbacks if isinstance(cb, SlurmRequeue))
        (Path(trainer.default_root_dir) / f"holding-rank{trainer.global_rank}").touch()
        deadline = time.monotonic() + self.timeout_s
        while not requeue.requested:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no requeue signal within {self.timeout_s:.0f} s at step {self.hold_at}")
            time.sleep(0.05)
