"""A real 2-process CPU DDP run (strategy=ddp, gloo) launched through train.py as a subprocess.

A small callback (below, loaded by class_path from this file) records on every rank the
training batches it saw and a checksum of the final weights, so the test can check that the
ranks drew different data, that gradients were synchronised (identical weights), and that
both ranks shared rank 0's run directory.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


class RecordRankData(L.Callback):
    """Test helper: writes ddp_rank<r>.json into the run directory at the end of fit."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch["input_ids"][:, :8].flatten().tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        out = Path(trainer.default_root_dir) / f"ddp_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"world": trainer.world_size, "batches": self.batches, "checksum": checksum,
                                   "root": str(trainer.default_root_dir)}))


@pytest.mark.slow  # three Python processes importing Lightning on 2 cores
def test_two_process_cpu_ddp(tmp_path, memlm_cache):
    cmd = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "transformer_micro.yaml"),
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.max_steps=3",
        "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
        "--model.init_args.block_size=32", "--data.init_args.tokenizer=char", "--data.init_args.block_size=32",
        "--data.init_args.batch_size=4", "--data.init_args.max_val_batches=1",
        "--trainer.callbacks+=test_ddp.RecordRankData",
        "--run.root", str(tmp_path / "runs"), "--run.logger=[csv]",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "lightning_modules")]), "MEMLM_QUIET": "1",
           "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    for key in ("MEMLM_RUN_DIR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs" / "transformer_micro").iterdir()]
    assert [p.name for p in runs] == ["version_0"], "both ranks must share rank 0's run directory"
    run = runs[0]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    ranks = [json.loads((run / f"ddp_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and Path(r["root"]) == run for r in ranks)
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 3
    assert ranks[0]["batches"] != ranks[1]["batches"], "the two ranks drew the same data"
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9, abs=1e-9), "weights diverged"
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(1 for r in rows if r["train/loss"]) == 3 and any(r["val/loss"] for r in rows)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["memlm"]["tokenizer"]
    assert "run directory:" in proc.stdout and proc.stdout.count("run directory:") == 1  # summary from rank 0 only
