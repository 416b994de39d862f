"""TokenThroughput: train/tokens_per_sec from the real steps of a window, train/mfu from it."""
from __future__ import annotations

import csv
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from memlm.callbacks import throughput
from memlm.callbacks.throughput import TokenThroughput, peak_flops

B, T, STEP_SECONDS = 4, 8, 0.02


class Sleepy(L.LightningModule):
    """Each step takes at least STEP_SECONDS, so the throughput has a known upper bound."""

    def __init__(self, with_ids: bool = True) -> None:
        super().__init__()
        self.w = torch.nn.Linear(T, 1)
        self.with_ids = with_ids

    def flops_per_token(self, seq_len: int) -> float:
        return 1000.0 * seq_len

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_SECONDS)
        x = batch["input_ids"] if self.with_ids else batch["x"]
        loss = self.w(x.float()).pow(2).mean()
        self.log("train/loss", loss)  # something in metrics.csv for every step
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run(tmp_path, monkeypatch, steps: int, window: int | None, with_ids: bool = True, log_every: int = 1) -> list[dict]:
    monkeypatch.setattr(throughput, "peak_flops", lambda device: 1e6)  # a known peak: mfu is checkable
    key = "input_ids" if with_ids else "x"
    batches = torch.utils.data.DataLoader([{key: torch.randint(0, 50, (B, T))} for _ in range(steps)], batch_size=None)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=CSVLogger(str(tmp_path), name="", version=""),
                        callbacks=[TokenThroughput(window=window)], log_every_n_steps=log_every, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Sleepy(with_ids), train_dataloaders=batches)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("train/tokens_per_sec")]


def test_tokens_per_sec_is_measured_over_each_window(tmp_path, monkeypatch):
    rows = run(tmp_path, monkeypatch, steps=6, window=2)
    # a new value once per window of 2 steps, at its last step (0-based steps 1, 3, 5); Lightning
    # repeats a value logged from a callback hook on the following rows until it is logged again
    fresh = [r for i, r in enumerate(rows) if i == 0 or r["train/tokens_per_sec"] != rows[i - 1]["train/tokens_per_sec"]]
    assert [int(r["step"]) for r in fresh] == [1, 3, 5]
    ceiling = B * T / STEP_SECONDS  # no window can beat the sleep inside every step
    for r in fresh:
        tps = float(r["train/tokens_per_sec"])
        assert 0.1 * ceiling < tps <= ceiling, (tps, ceiling)
        assert float(r["train/mfu"]) == pytest.approx(tps * 1000.0 * T / 1e6, rel=1e-5)


def test_default_window_follows_the_logging_steps(tmp_path, monkeypatch):
    # no log call between Lightning's logging steps: each value spans the steps since the last one
    rows = run(tmp_path, monkeypatch, steps=9, window=None, log_every=3)
    assert [int(r["step"]) for r in rows] == [2, 5, 8]
    ceiling = B * T / STEP_SECONDS
    for r in rows:
        assert 0.1 * ceiling < float(r["train/tokens_per_sec"]) <= ceiling


def test_batches_without_token_ids_log_nothing(tmp_path, monkeypatch):
    assert run(tmp_path, monkeypatch, steps=4, window=1, with_ids=False) == []
    assert "train/tokens_per_sec" not in (tmp_path / "metrics.csv").read_text()


def test_peak_flops_table_for_known_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda")) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(torch.device("cuda")) is None  # unknown: no MFU rather than a made-up one
    assert peak_flops(torch.device("meta")) is None
