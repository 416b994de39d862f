"""Golden loss curve of a seeded tiny transformer run (char tokenizer, builtin corpus, 10 steps).

Any change to the data pipeline, tokenizer, initialisation, loss, optimiser or schedule moves
this curve; if the change is intended, regenerate the golden file and commit it:

    MEMLM_UPDATE_GOLDEN=1 python -m pytest tests/lightning_modules/test_golden.py

The comparison uses rtol 1e-3 because CPU BLAS kernels differ slightly between machines. The
builtin corpus is CPython's pydoc_data text, which changes between Python minor versions, so
the curve is only compared on the Python version that recorded it.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest

from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "transformer_tiny_loss.json"
ARGS = [
    "--model.init_args.n_layer=2", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
    "--model.init_args.block_size=32", "--model.init_args.optimizer.warmup_steps=3", "--model.init_args.optimizer.max_steps=10",
    "--model.init_args.optimizer.learning_rate=3e-3",
    "--data.init_args.source=builtin", "--data.init_args.tokenizer=char", "--data.init_args.block_size=32",
    "--data.init_args.batch_size=8", "--data.init_args.max_val_batches=2", "--data.init_args.seed=1234",
    "--trainer.max_steps=10", "--trainer.val_check_interval=10", "--trainer.log_every_n_steps=1",
    "--trainer.precision=32-true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--seed_everything=1234",
]


def run_curve(root: Path) -> dict:
    argv = ["fit", "--config", str(ROOT / "configs" / "transformer_micro.yaml"), "--run.root", str(root),
            "--run.logger=[csv]", *ARGS]
    try:
        cli = MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    with open(cli.run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"])) if r["train/loss"]]
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    return {"train_loss": train, "val_loss": val[-1], "vocab_size": cli.datamodule.vocab_size}


def test_golden_loss_curve(tmp_path, memlm_cache):
    got = run_curve(tmp_path)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    if os.environ.get("MEMLM_UPDATE_GOLDEN") == "1":
        import torch

        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({**got, "python": py, "torch": torch.__version__, "args": ARGS}, indent=1) + "\n")
        pytest.skip(f"golden curve regenerated at {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    if want["python"] != py:
        pytest.skip(f"golden curve recorded on Python {want['python']}; the builtin corpus differs on Python {py}")
    assert got["vocab_size"] == want["vocab_size"]
    assert len(got["train_loss"]) == len(want["train_loss"]) == 10
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-3)
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-3)
    # and the curve is a learning curve, not noise around the initial loss
    assert got["train_loss"][-1] < got["train_loss"][0] - 0.3
