"""WallClockBudget: training stops when the budget is spent, the LR decay follows the budget, snapshots."""
from __future__ import annotations

import json
import time

import lightning as L
import pytest
import torch

from memlm.callbacks.budget import WallClockBudget
from memlm.core.errors import MemLMError
from memlm.lightning_modules.transformer import TransformerLM

V, T, B, STEP_S = 16, 8, 2, 0.05


class SlowLM(TransformerLM):
    def training_step(self, batch, batch_idx):
        time.sleep(STEP_S)  # a known floor on each step's wall time
        return super().training_step(batch, batch_idx)


def loader(n: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (n, B, T + 1), generator=g)
    return torch.utils.data.DataLoader([{"input_ids": r[:, :-1], "targets": r[:, 1:]} for r in x], batch_size=None)


def test_budget_stops_training_and_ends_the_decay_at_the_floor(tmp_path):
    lm = SlowLM(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16,
                optimizer={"learning_rate": 1e-2, "warmup_steps": 1, "max_steps": 10_000, "min_lr_ratio": 0.1})
    budget = WallClockBudget(minutes=1.0 / 60, snapshots=2, snapshot_dir=str(tmp_path / "snaps"))  # one second
    trainer = L.Trainer(max_steps=1000, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[budget])
    t0 = time.perf_counter()
    trainer.fit(lm, train_dataloaders=loader(1000))
    assert time.perf_counter() - t0 < 20
    assert 3 <= trainer.global_step < 1000 / 2  # stopped by the clock (each step sleeps 50 ms), not max_steps
    # the step-based horizon (10,000) would leave the LR near its 1e-2 peak; the budget brought it to
    # the 1e-3 floor (within the last step's share of the budget: the scheduler steps once more after the stop)
    assert 1e-3 <= trainer.optimizers[0].param_groups[0]["lr"] < 1.2e-3
    elapsed = json.loads((tmp_path / "snaps" / "budget_elapsed.json").read_text())
    assert sorted(elapsed) == ["budget-1of2.ckpt", "budget-2of2.ckpt"]
    assert 0.5 <= elapsed["budget-1of2.ckpt"] < elapsed["budget-2of2.ckpt"]
    assert elapsed["budget-2of2.ckpt"] >= 1.0
    half = torch.load(tmp_path / "snaps" / "budget-1of2.ckpt", weights_only=True)
    assert 0 < half["global_step"] < trainer.global_step


def test_budget_rejects_bad_settings():
    with pytest.raises(MemLMError, match="minutes must be > 0"):
        WallClockBudget(minutes=0)
    with pytest.raises(MemLMError, match="snapshot_dir"):
        WallClockBudget(minutes=1, snapshots=2)
