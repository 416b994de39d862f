"""Training progress that reads well wherever the output goes.

- In a terminal: one self-rewriting line, ``step 120/300 [######----] loss 4.12 | 5,431 tok/s |
  0:41 elapsed | ETA 1:02``, refreshed at most every ``refresh_s`` seconds.
- Anywhere else (a SLURM log, ``nohup``, CI, ``| tee``): one plain line every ``every_n_steps``
  steps or ``every_s`` seconds, whichever comes first, plus one line per validation:

      [train] step 120/300 | loss 4.1234 | 5,431 tok/s | elapsed 0:41 | eta 1:02

Counting is by optimizer step (``trainer.global_step``), never by epoch, so a step-based run
never shows ``Epoch 5/-2``. The loss is read from the device only when a line is printed, so
the hot path has no host sync. Lines go to stdout from global rank 0 only.

Also logs ``train/elapsed_s`` (wall seconds since the fit started, counting resumed time)
beside the loss, so run plots can put wall time on the x axis (``python -m memlm.plot``).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import torch
from lightning.pytorch.callbacks import ProgressBar


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StepProgress(ProgressBar):
    """Step-based progress: a live bar in a terminal, periodic plain lines in a log file."""

    def __init__(self, every_n_steps: int = 50, every_s: float = 30.0, refresh_s: float = 0.5,
                 stream: TextIO | None = None, tty: bool | None = None) -> None:
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self.every_s = float(every_s)
        self.refresh_s = float(refresh_s)
        self._stream = stream
        self._tty = tty
        self._enabled = True
        self._t0 = 0.0
        self._elapsed_before = 0.0  # wall time of earlier attempts (resume)
        self._last_print = 0.0
        self._last_step_printed = -1
        self._window_t = 0.0
        self._window_tokens = 0
        self._tps: float | None = None
        self._bar_open = False
        self._first_step = 0

    # -- ProgressBar protocol -----------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def is_tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _active(self, trainer) -> bool:
        return self._enabled and trainer.is_global_zero and not trainer.sanity_checking

    # -- state across resume: elapsed wall time keeps counting ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed_before = float(state_dict.get("elapsed_s", 0.0))

    def elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._t0 if self._t0 else 0.0)

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        self._t0 = now
        self._last_print = now
        self._window_t = now
        self._window_tokens = 0
        self._first_step = trainer.global_step  # after a resume: the restored step

    def _max_steps(self, trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        est = getattr(trainer, "estimated_stepping_batches", None)
        return int(est) if est is not None and math.isfinite(est) else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x = batch.get("input_ids") if isinstance(batch, dict) else None
        if isinstance(x, torch.Tensor):
            self._window_tokens += x.numel() * trainer.world_size
        step = trainer.global_step
        if step > 0 and step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("train/elapsed_s", self.elapsed(), on_step=True, on_epoch=False, rank_zero_only=True)
        if not self._active(trainer):
            return
        now = time.perf_counter()
        if self.is_tty:
            if now - self._last_print >= self.refresh_s:
                self._update_rate(now)
                self._write_bar(trainer, outputs, step)
                self._last_print = now
            return
        due_step = step % self.every_n_steps == 0 and step != self._last_step_printed
        if due_step or now - self._last_print >= self.every_s:
            self._update_rate(now)
            self._write_line(trainer, outputs, step)
            self._last_print = now
            self._last_step_printed = step

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # the clock on evaluation rows too, so val curves can be drawn against wall time
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            pl_module.log("train/elapsed_s", self.elapsed(), on_step=False, on_epoch=True, rank_zero_only=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._active(trainer):
            return
        vals = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not vals:
            return
        text = " | ".join(f"{k} {float(v):.4f}" for k, v in sorted(vals.items()))
        self._end_bar()
        self.stream.write(f"[val] step {trainer.global_step} | {text}\n")
        self.stream.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._active(trainer):
            self._end_bar()

    # -- rendering ------------------------------------------------------------------------------
    def _update_rate(self, now: float) -> None:
        dt = now - self._window_t
        if dt > 0 and self._window_tokens:
            self._tps = self._window_tokens / dt
        self._window_t, self._window_tokens = now, 0

    @staticmethod
    def _loss(trainer, outputs) -> float | None:
        value = None
        if isinstance(outputs, dict):
            value = outputs.get("loss")
        elif isinstance(outputs, torch.Tensor):
            value = outputs
        if value is None:
            value = trainer.callback_metrics.get("train/loss")
        if value is None:
            return None
        return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)  # the one sync per line

    def _fields(self, trainer, outputs, step: int) -> tuple[str, str, str, str, str]:
        total = self._max_steps(trainer)
        elapsed = self.elapsed()
        # ETA from this attempt's pace (resumed runs start their clock at the resumed step)
        done = step - self._first_step
        spent = time.perf_counter() - self._t0
        eta = (total - step) * spent / done if total and done > 0 else None
        loss = self._loss(trainer, outputs)
        steps = f"{step}/{total}" if total else f"{step}"
        loss_s = f"{loss:.4f}" if loss is not None else "?"
        tps_s = f"{self._tps:,.0f} tok/s" if self._tps else "? tok/s"
        return steps, loss_s, tps_s, format_duration(elapsed), format_duration(eta)

    def _write_line(self, trainer, outputs, step: int) -> None:
        steps, loss, tps, elapsed, eta = self._fields(trainer, outputs, step)
        self.stream.write(f"[train] step {steps} | loss {loss} | {tps} | elapsed {elapsed} | eta {eta}\n")
        self.stream.flush()

    def _write_bar(self, trainer, outputs, step: int) -> None:
        steps, loss, tps, elapsed, eta = self._fields(trainer, outputs, step)
        total = self._max_steps(trainer)
        width = 20
        filled = int(width * min(1.0, step / total)) if total else 0
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\rstep {steps} [{bar}] loss {loss} | {tps} | {elapsed} elapsed | ETA {eta}\033[K")
        self.stream.flush()
        self._bar_open = True

    def _end_bar(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_open = False
