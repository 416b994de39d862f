"""SLURM auto-requeue that checkpoints between training steps, on every rank at the same step.

Lightning's own SIGUSR1 handler (``SLURMEnvironment(auto_requeue=True)``) writes the hpc
checkpoint inside the signal handler, wherever the main thread is: usually mid-step, after the
loader produced the batch but before the loop counted it, so the resumed run skips one batch
and its loss curve departs from an uninterrupted run; under DDP one rank can enter the
checkpoint's barrier while another is inside a gradient all-reduce.

This callback takes the requeue signal first (Lightning keeps a handler that is already
installed) and only notes it. After each training batch the ranks agree with one all-reduce
of that flag; if any rank was signalled, all of them write ``hpc_ckpt_<n>.ckpt`` into the run
directory, flush and close the loggers, rank 0 runs ``scontrol requeue``, and every rank waits
for Slurm to end the job (nothing may be logged after the checkpoint). The requeued job (same ``SLURM_JOB_ID``, same run directory)
resumes from that checkpoint: MemLMCLI passes the newest of it and ``last.ckpt``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from memlm.core.errors import MemLMError


def _slurm_environment(trainer: L.Trainer) -> SLURMEnvironment | None:
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return env if isinstance(env, SLURMEnvironment) and env.auto_requeue else None


def _slurm_job_id() -> str:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class SlurmRequeue(L.Callback):
    """Active only under SLURM with Lightning's auto-requeue on (the default there)."""

    def __init__(self, wait_for_kill_s: float = 600.0) -> None:
        self.wait_for_kill_s = wait_for_kill_s
        self.requested = False
        self._signum: int | None = None
        self._previous = None

    def _note(self, signum, frame) -> None:
        self.requested = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        env = _slurm_environment(trainer)
        if stage != "fit" or env is None or env.requeue_signal is None or self._signum is not None:
            return
        self._signum = int(env.requeue_signal)
        self._previous = signal.signal(self._signum, self._note)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._signum is not None:
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._signum, self._previous = None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._signum is None:
            return
        flag = torch.tensor([1.0 if self.requested else 0.0], device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) == 0.0:
            return
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        rank_zero_info(f"requeue signal: saved {path} at step {trainer.global_step}")
        # This batch's metrics reach the loggers only after on_train_batch_end, and the requeued
        # job starts with the next batch: hand them over now.
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.finalize("finished")
            finish = getattr(getattr(logger, "experiment", None), "finish", None) if trainer.is_global_zero else None
            if callable(finish) and type(logger).__name__ == "WandbLogger":
                finish()  # the offline run files are complete before Slurm signals the job
        requeued = True
        if trainer.is_global_zero:
            job = _slurm_job_id()
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            requeued = result.returncode == 0
            if not requeued:
                rank_zero_warn(f"scontrol requeue {job} failed ({result.stderr.strip()}); training goes on without W&B, {path} stays")
        if not trainer.strategy.broadcast(requeued):
            self.requested = False
            return
        # No more steps, validation or log rows may follow the checkpoint: the requeued job
        # redoes them. Slurm sends SIGTERM, then SIGKILL after KillWait.
        deadline = time.monotonic() + self.wait_for_kill_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
        raise MemLMError(f"requeue of SLURM job {_slurm_job_id()} was requested but Slurm did not stop it; check scontrol show job")


def _saved_step(path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt.get("global_step", -1)), os.stat(path).st_mtime_ns


def resume_checkpoint(run_dir, requested: str | None) -> str | None:
    """The checkpoint ``fit`` should resume from in ``run_dir``, given ``--ckpt_path``.

    Lightning reads ``hpc_ckpt_<n>.ckpt`` only when ``ckpt_path`` is unset, and then ignores a
    ``last.ckpt`` written after it (a job preempted without the signal, or requeued later);
    with ``--ckpt_path last`` it ignores a newer hpc checkpoint. Here both are candidates and
    the one with the higher global step wins. Explicit paths and ``best`` are left alone, and an
    unset ``ckpt_path`` outside SLURM keeps meaning "start fresh".
    """
    from pathlib import Path

    if requested not in (None, "last", "hpc"):
        return requested
    run_dir = Path(run_dir)

    def number(p: Path) -> int:
        tail = p.stem.rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    hpc = max(run_dir.glob("hpc_ckpt_*.ckpt"), key=number, default=None)
    if hpc is None or (requested is None and not SLURMEnvironment.detect()):
        return requested
    candidates = [hpc]
    last = run_dir / "checkpoints" / "last.ckpt"
    if requested != "hpc" and last.is_file():
        candidates.append(last)
    return str(max(candidates, key=_saved_step))
