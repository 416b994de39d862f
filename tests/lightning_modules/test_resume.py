"""Resume equality: 4 steps + resume to 8 == 8 uninterrupted steps (random-window sampler, CPU).

The LR schedule horizon is fixed by ``--model.init_args.optimizer.max_steps=8`` so it does not depend on
``trainer.max_steps``; ``steps_per_epoch=3`` puts the resume point (after step 4) in the middle
of epoch 1 and the continued run crosses the epoch-1 -> epoch-2 boundary after step 6.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "transformer_micro.yaml"
ARGS = [
    "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
    "--model.init_args.block_size=32", "--model.init_args.optimizer.warmup_steps=2", "--model.init_args.optimizer.max_steps=8",
    "--data.init_args.tokenizer=char", "--data.init_args.block_size=32", "--data.init_args.batch_size=4",
    "--data.init_args.max_val_batches=1", "--data.init_args.steps_per_epoch=3",
    "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]


def fit(root: Path, version: str, max_steps: int, *extra: str) -> MemLMCLI:
    argv = ["fit", "--config", str(CONFIG), "--run.root", str(root), "--run.logger=[csv]", "--run.name=resume",
            f"--run.version={version}", f"--trainer.max_steps={max_steps}", *ARGS, *extra]
    try:
        return MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


def losses(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(fh) if r.get(key)}


def test_resume_continues_the_loss_curve(tmp_path, memlm_cache):
    a = fit(tmp_path, "a", 8)
    b1 = fit(tmp_path, "b", 4)
    assert b1.trainer.global_step == 4 and (b1.run_dir / "checkpoints" / "last.ckpt").is_file()
    first = losses(b1.run_dir, "train/loss")
    b2 = fit(tmp_path, "b", 8, "--ckpt_path=last")
    assert b2.run_dir == b1.run_dir
    assert b2.trainer.global_step == 8 and b2.trainer.current_epoch == a.trainer.current_epoch
    ref = losses(a.run_dir, "train/loss")
    resumed = losses(b2.run_dir, "train/loss")  # metrics.csv keeps the curve from before the resume
    assert {k: resumed[k] for k in first} == first
    assert sorted(ref) == list(range(8))
    for step in range(8):  # steps 1-4 trivially, steps 5-8 only if model, optimizer, LR and data resumed
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), (step, resumed[step], ref[step])
    # the resumed run validates like the uninterrupted one, and ends with identical weights
    assert losses(b2.run_dir, "val/loss")[7] == pytest.approx(losses(a.run_dir, "val/loss")[7], abs=1e-6)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b2.model.state_dict()[k], v, rtol=0, atol=1e-6)
