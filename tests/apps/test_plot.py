"""python -m memlm.plot draws loss and bpb against steps and wall time from a run it trains."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memlm.core.errors import MemLMError
from memlm.plot import find_metrics, plot, read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_plot_of_a_trained_run(tmp_path, memlm_cache):
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "transformer_micro.yaml"),
           "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=16",
           "--model.init_args.block_size=16", "--data.init_args.tokenizer=char", "--data.init_args.block_size=16",
           "--data.init_args.batch_size=2", "--data.init_args.max_val_batches=1", "--trainer.max_steps=8",
           "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=2", "--run.root", str(tmp_path / "runs"),
           "--run.logger=[csv]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "MEMLM_QUIET": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "runs" / "transformer_micro" / "version_0"
    (csv,) = find_metrics(tmp_path / "runs")
    metrics = read_metrics(csv)
    assert len(metrics["train/loss"]) == 4 and len(metrics["val/loss"]) == 2
    clock = [t for _, t in metrics["train/elapsed_s"]]
    assert clock == sorted(clock) and clock[0] > 0  # wall time rises with the steps
    out = tmp_path / "curves.png"
    rc = subprocess.run([sys.executable, "-m", "memlm.plot", str(run), "--out", str(out)], capture_output=True,
                        text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_missing_run_and_empty_metrics_are_one_line_errors(tmp_path):
    with pytest.raises(MemLMError, match="not found"):
        find_metrics(tmp_path / "nope")
    (tmp_path / "metrics.csv").write_text("epoch,step,train/tokens_per_sec\n0,1,5.0\n")
    with pytest.raises(MemLMError, match="no loss or bpb"):
        plot([tmp_path], tmp_path / "x.png")
