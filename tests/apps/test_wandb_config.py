"""The W&B run a fit creates (offline here) carries what dashboards group and filter by,
read back from the offline run file (see memlm/apps/wandb_offline.py)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import lightning as L
import pytest

from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI
from memlm.apps.wandb_offline import offline_run_file, records_when_closed

wandb = pytest.importorskip("wandb")
ROOT = Path(__file__).resolve().parents[2]


def test_offline_run_holds_config_code_version_tokenizer_params_and_hardware(tmp_path, memlm_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = ["fit", "--config", str(ROOT / "configs" / "transformer_micro.yaml"), "--run.root", str(tmp_path),
            "--run.logger=[wandb]", "--trainer.max_steps=1", "--trainer.val_check_interval=1",
            "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
            "--model.init_args.block_size=32", "--data.init_args.tokenizer=char", "--data.init_args.block_size=32",
            "--data.init_args.batch_size=2", "--data.init_args.max_val_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    try:
        cli = MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        wandb.finish()
    path = offline_run_file(cli.run_dir)
    run_id = path.stem[len("run-"):]
    records = records_when_closed(path)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds, kinds
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}

    assert run.run_id == run_id and run.run_group == "TransformerLM"
    assert set(run.tags) == {"size:micro", "stage:fit"}
    # the full resolved config, as parsed (overrides applied)
    assert config["model"]["init_args"]["n_layer"] == 1 and config["trainer"]["max_steps"] == 1
    meta = config["memlm"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert meta["git"]["commit"] == head and isinstance(meta["git"]["dirty"], bool)
    tok = cli.datamodule.tokenizer
    assert meta["tokenizer"] == {"kind": "char", "vocab_size": tok.vocab_size}
    total = sum(p.numel() for p in cli.model.parameters())
    assert meta["params"] == {"total": total, "trainable": total, "active": total}
    assert meta["hardware"]["world_size"] == 1 and meta["hardware"]["cpu_count"] == os.cpu_count()
    assert meta["hardware"]["gpu_count"] == 0 and meta["hardware"]["cpu"]
