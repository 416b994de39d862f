"""FSDP for the *_base presets: configs/hmst_base_fsdp.yaml's strategy, run at micro size on 2 CPU ranks.

The strategy block (auto-wrap policy, sharding, state-dict type) is read from the real preset and
applied to the hmst_micro model; only the class is swapped for ``fsdp_cpu.CPUFSDPStrategy``, which
lifts Lightning's and torch's CUDA-only guards (see that file). What runs is a real sharded fit.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from memlm.apps.cli import MemLMCLI
from memlm.models.hmst.model import HMSTBlock

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "hmst_base_fsdp.yaml"


class _Parsed(Exception):
    pass


class _ParseOnly(MemLMCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def preset_strategy() -> dict:
    return yaml.safe_load(PRESET.read_text())["trainer"]["strategy"]


def test_preset_strategy_builds_fsdp_with_block_wrap_policy():
    with pytest.raises(_Parsed) as info:
        _ParseOnly(L.LightningModule, L.LightningDataModule, args=["fit", "--config", str(PRESET)])
    strategy = info.value.args[0]["fit"]["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    init = strategy["init_args"]
    # jsonargparse already turns the name into torch's enum
    assert getattr(init["sharding_strategy"], "name", init["sharding_strategy"]) == "FULL_SHARD"
    assert init["state_dict_type"] == "full"
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    built = FSDPStrategy(**init)
    policy = built.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert policy._module_classes == {HMSTBlock}, "every HMSTBlock must be its own FSDP unit"


@pytest.mark.slow  # three Python processes importing Lightning on 2 cores: 126 s on the loaded machine
def test_two_process_cpu_fsdp_fit_and_checkpoint_loads(tmp_path, memlm_cache):
    strategy = preset_strategy()
    strategy["class_path"] = "fsdp_cpu.CPUFSDPStrategy"
    overlay = tmp_path / "fsdp.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"strategy": strategy}}))
    cmd = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "hmst_micro.yaml"),
        "--config", str(overlay), "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_steps=3",
        "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=4", "--data.init_args.block_size=32", "--model.init_args.block_size=32",
        "--data.init_args.max_val_batches=1", "--run.root", str(tmp_path / "runs"), "--run.logger=[csv]",
        "--run.num_threads=1",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "lightning_modules")]),
           "MEMLM_QUIET": "1", "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    for key in ("MEMLM_RUN_DIR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "hmst_micro" / "version_0"
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["global_step"] == 3
    # a full (gathered) state dict with the plain module's key names, not FSDP's flat shards
    assert not any("_fsdp_wrapped_module" in k or "flat_param" in k for k in ckpt["state_dict"])
    from memlm.checkpoint import load_module

    module = load_module(ckpt_path)
    expected = {k for k in module.state_dict() if not k.startswith("evaluation")}
    assert expected <= set(ckpt["state_dict"]), "checkpoint is missing parameters of the unsharded model"
    for key, value in module.state_dict().items():
        if key in ckpt["state_dict"]:
            assert value.shape == ckpt["state_dict"][key].shape, key
    assert "final validation:" in proc.stdout and "val/loss=" in proc.stdout
