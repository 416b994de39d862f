"""The training hot path logs only at Lightning's logging steps, and checks the loss without a per-step sync."""
from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from memlm.core.errors import MemLMError
from memlm.lightning_modules.transformer import TransformerLM

V, T, B = 16, 8, 2


def loader(n: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (n, B, T + 1), generator=g)
    return torch.utils.data.DataLoader([{"input_ids": r[:, :-1], "targets": r[:, 1:]} for r in x], batch_size=None)


def tiny(**opt):
    return TransformerLM(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16, optimizer=opt or None)


class CountLogs(L.Callback):
    def __init__(self):
        self.calls = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        original = pl_module.log
        if getattr(original, "_counted", False):
            return

        def log(name, *a, **k):
            self.calls.append((trainer.global_step, name))
            return original(name, *a, **k)

        log._counted = True
        pl_module.log = log


def test_train_loss_is_logged_at_logging_steps_and_the_last_step(tmp_path):
    counter = CountLogs()
    trainer = L.Trainer(max_steps=7, accelerator="cpu", logger=CSVLogger(str(tmp_path), name="", version=""),
                        log_every_n_steps=3, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[counter])
    trainer.fit(tiny(), train_dataloaders=loader(7))
    assert [s for s, n in counter.calls if n == "train/loss"] == [2, 5, 6]  # not a call on every step
    with open(tmp_path / "metrics.csv", newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    assert steps[:2] == [2, 5]  # what Lightning writes is unchanged
    assert "train/loss" in trainer.callback_metrics  # a short run still leaves its final value


class NaNAt(TransformerLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 1 else loss

    def _check_finite(self, loss):
        super()._check_finite(loss * float("nan") if self.global_step == 1 else loss)


def test_nonfinite_loss_between_logging_steps_stops_at_the_next_checkpoint(tmp_path):
    lm = NaNAt(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), filename="last", every_n_train_steps=1, save_top_k=1,
                           monitor=None, enable_version_counter=False)
    trainer = L.Trainer(max_steps=20, accelerator="cpu", logger=False, log_every_n_steps=10, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(MemLMError, match="loss became non-finite at global step 1;"):
        trainer.fit(lm, train_dataloaders=loader(20))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 1  # written before the bad step; the write after it was refused
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
