"""2-process CPU DDP (gloo) under ``bf16-mixed``: synced logging, buffer broadcast, fp32 state.

One HMST fit with a validation pass, the worker written to tmp_path (Lightning's launcher
starts rank 1 itself). It checks, per rank:

- logging never deadlocks (the run finishes) and the synced validation metrics have the same
  keys on every rank, equal values, and are fp32 although the forward ran in bf16;
- DDP's buffer broadcast (on by default in Lightning's DDP strategy) overwrites a registered
  buffer with rank 0's value at every forward: which is why memories live *outside* registered
  buffers. A per-rank probe buffer is overwritten, while the per-rank episodic store and the
  carried SSM state (plain attributes) keep their own values;
- the carried SSM state stays fp32 under bf16 autocast.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

WORKER = r'''
import hashlib, json, os, sys
import torch
torch.set_num_threads(1)
import lightning as L
from torch.utils.data import DataLoader
from memlm.core.tokenizer import build_tokenizer
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.language_model import OptimizerConfig

OUT = sys.argv[1]

def chunks(seed):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(3, 200, (2, 3 * 16 + 1), generator=g)
    return [{"input_ids": data[:, 16 * k:16 * k + 16], "targets": data[:, 16 * k + 1:16 * k + 17],
             "stream": True, "first": k == 0} for k in range(3)]

class Streams(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(chunks(100 + self.trainer.global_rank), batch_size=None, shuffle=False)
    def val_dataloader(self):
        return DataLoader(chunks(300 + self.trainer.global_rank), batch_size=None, shuffle=False)

class Probe(HMSTLanguageModel):
    def setup(self, stage):
        super().setup(stage)
        # a registered buffer that differs per rank, as a memory kept in a buffer would
        self.register_buffer("rank_probe", torch.full((3,), float(self.trainer.global_rank + 1)))

class Record(L.Callback):
    def on_validation_end(self, trainer, pl_module):
        synced = {k: [str(v.dtype), float(v)] for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        st = pl_module.carried_state
        report = {
            "val": synced,
            "probe": pl_module.rank_probe.tolist(),
            "episodic_pooled_sum": float(pl_module.episodic.pooled.double().sum()),
            "episodic_written": pl_module.episodic.written,
            "ssm_dtypes": sorted({str(t.dtype) for t in pl_module.state_to_dict(st).values() if t.is_floating_point()}),
            "ssm_sum": float(sum(t.double().sum() for k, t in pl_module.state_to_dict(st).items() if k.startswith("ssm"))),
        }
        with open(os.path.join(OUT, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)

torch.manual_seed(0)
m = Probe(vocab_size=259, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=32, n_experts=4, top_k=2,
          exit_layer=1, ssm_d_state=4, ssm_expand=1, mem_top_k=2, mem_max_items=1000, mem_write_stride=4,
          episodic_capacity=16, controller_hidden=16, critic_d_model=16, critic_layers=1, critic_heads=2,
          critic_max_len=32, optimizer=OptimizerConfig(warmup_steps=1),
          gate_schedule={"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.5, "expert_bias": 0.5})
m.set_tokenizer(build_tokenizer("byte", [], 259))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", precision="bf16-mixed",
                    max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=3,
                    use_distributed_sampler=False, callbacks=[Record()])
trainer.fit(m, datamodule=Streams())
'''


@pytest.mark.slow  # one 2-process fit (~40 s on a loaded 2-core machine)
@pytest.mark.timeout(240)
def test_bf16_ddp_syncs_fp32_metrics_and_keeps_rank_local_memory(tmp_path):
    script = tmp_path / "ddp_bf16_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MEMLM_QUIET="1", PL_TORCH_DISTRIBUTED_BACKEND="gloo")
    for key in ("MEMLM_RUN_DIR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # synced metrics: same keys everywhere (a missing key on one rank would hang the all-reduce), fp32, equal
    assert {"val/loss", "val/ppl", "val/acc"} <= set(r0["val"])
    assert r0["val"].keys() == r1["val"].keys()
    for key, (dtype, value) in r0["val"].items():
        assert dtype == "torch.float32", key
        assert r1["val"][key] == pytest.approx([dtype, value], rel=1e-6), key
    # DDP broadcast rank 0's buffer over rank 1's: a memory must never live in a registered buffer
    assert r0["probe"] == r1["probe"] == [1.0, 1.0, 1.0]
    # ... and the HMST memories (plain attributes) stayed rank-local
    assert r0["episodic_written"] == r1["episodic_written"] == 3 * 2
    assert r0["episodic_pooled_sum"] != r1["episodic_pooled_sum"]
    assert r0["ssm_sum"] != r1["ssm_sum"]
    # the carried SSM state stays fp32 under bf16 autocast
    assert r0["ssm_dtypes"] == r1["ssm_dtypes"] == ["torch.float32"]
