"""Tokens/s and model FLOPs utilisation, logged as ``train/tokens_per_sec`` and ``train/mfu``.

MFU = tokens/s x FLOPs per token / peak FLOP/s. The peak is taken from a table of known
GPUs (dense bf16) or, on a CPU, measured once with a float32 matmul so the number means
"fraction of what this machine's matmul can do".
"""
from __future__ import annotations

import time

import lightning as L
import torch

from memlm.core.bench import measure_matmul_peak_flops

# Dense (non-sparse) peak FLOP/s for bf16/fp16 tensor cores; fp32 where noted.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return None
    if device.type == "cpu":
        return measure_matmul_peak_flops(n=512, repeats=8)
    return None


class TokenThroughput(L.Callback):
    """Logs training tokens per second (all ranks) and MFU.

    ``window`` None (the default) measures the span between Lightning's logging steps
    (``trainer.log_every_n_steps``) and logs only there: a ``self.log`` call costs about as much
    as a small model's whole step on a CPU, and Lightning would drop values logged in between.
    ``window=N`` measures and logs every N steps instead.
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self._t0: float | None = None
        self._tokens = 0
        self._steps = 0
        self._peak: float | None = None
        self._peak_known = False
        self._fpt: dict[int, float | None] = {}  # FLOPs per token by sequence length

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._peak_known:
            self._peak = peak_flops(pl_module.device)
            self._peak_known = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def _due(self, trainer) -> bool:
        if self.window is not None:
            return self._steps >= self.window
        return bool(trainer._logger_connector.should_update_logs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x = batch["input_ids"] if isinstance(batch, dict) and "input_ids" in batch else None
        if x is None:
            return
        self._tokens += x.numel() * trainer.world_size
        self._steps += 1
        if not self._due(trainer):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        tps = self._tokens / max(dt, 1e-9)
        pl_module.log("train/tokens_per_sec", tps, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        seq_len = x.shape[-1]
        if seq_len not in self._fpt:
            self._fpt[seq_len] = getattr(pl_module, "flops_per_token", lambda _t: None)(seq_len)
        fpt = self._fpt[seq_len]
        if fpt and self._peak:
            mfu = tps / trainer.world_size * fpt / self._peak
            pl_module.log("train/mfu", mfu, on_step=True, on_epoch=False, rank_zero_only=True)
        self._t0, self._tokens, self._steps = time.perf_counter(), 0, 0
