"""HAMT's carried memory state under 2-process CPU DDP (gloo): per rank, saved per rank, and
restored per rank.

Each rank reads its own contiguous streams, so its slot memory differs from the other's. The
checkpoint must hold both (stacked over ranks, index = global rank) and a resumed run must
give each rank back its own slice, not rank 0's and not a fresh state. The callback below is
loaded by class_path from this file (PYTHONPATH) and records per rank a checksum of the state.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def checksums(module, state) -> dict[str, float]:
    return {k: float(v.detach().double().sum()) for k, v in module.state_to_dict(state).items()}


class RecordCarriedState(L.Callback):
    """Test helper: writes hamt_rank<r>_<event>.json with the carried state's checksums."""

    def _write(self, trainer, pl_module, event: str) -> None:
        state = pl_module.carried_state
        out = Path(trainer.default_root_dir) / f"hamt_rank{trainer.global_rank}_{event}.json"
        out.write_text(json.dumps({"world": trainer.world_size, "step": trainer.global_step,
                                   "sums": None if state is None else checksums(pl_module, state)}))

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "start")


def fit(tmp_path: Path, max_steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "hamt_micro.yaml"),
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu", f"--trainer.max_steps={max_steps}",
        "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--model.init_args.n_layer=1", "--model.init_args.n_embd=32",
        "--model.init_args.n_slots=4", "--model.init_args.scan_chunk=16", "--data.init_args.tokenizer=char",
        "--data.init_args.block_size=32", "--data.init_args.batch_size=2", "--data.init_args.max_val_batches=1",
        "--trainer.callbacks+=test_hamt_ddp.RecordCarriedState", "--run.root", str(tmp_path / "runs"),
        "--run.logger=[csv]", "--run.name=hamt", "--run.version=ddp", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)]), "MEMLM_QUIET": "1",
           "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    for key in ("MEMLM_RUN_DIR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow  # two 2-process runs
def test_carried_state_is_per_rank_and_restored_per_rank(tmp_path, memlm_cache):
    first = fit(tmp_path, 3)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "hamt" / "ddp"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    tbptt = saved["tbptt"]
    assert tbptt["has_state"] and tbptt["world_size"] == 2
    tensors = tbptt["tensors"]
    assert tensors and all(t.shape[0] == 2 for t in tensors.values())
    assert any(not torch.equal(t[0], t[1]) for t in tensors.values()), "both ranks saved the same memory"

    second = fit(tmp_path, 4, "--ckpt_path=last")
    assert second.returncode == 0, second.stderr[-3000:]
    for rank in (0, 1):
        start = json.loads((run / f"hamt_rank{rank}_start.json").read_text())
        assert start["world"] == 2 and start["step"] == 3 and start["sums"] is not None
        expected = {k: float(t[rank].double().sum()) for k, t in tensors.items()}
        assert start["sums"].keys() == expected.keys()
        for key, value in expected.items():  # this rank's own slice, not rank 0's, not a fresh state
            assert start["sums"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (rank, key)
