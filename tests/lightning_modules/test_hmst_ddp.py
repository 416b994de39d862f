"""2-process CPU DDP (gloo): a real Lightning fit keeps the replicated semantic memory identical.

The worker script is written to tmp_path and run as ``python worker.py OUT``; Lightning's
subprocess launcher starts rank 1 itself. Each rank feeds different tokens, so identical
stores prove that writes were all-gathered, not merely computed alike.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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

class Streams(L.LightningDataModule):
    def train_dataloader(self):
        rank = self.trainer.global_rank
        g = torch.Generator().manual_seed(100 + rank)
        data = torch.randint(3, 200, (2, 4 * 16 + 1), generator=g)
        batches = [{"input_ids": data[:, 16 * k:16 * k + 16], "targets": data[:, 16 * k + 1:16 * k + 17],
                    "stream": True, "first": k == 0} for k in range(4)]
        return DataLoader(batches, batch_size=None, shuffle=False)

def build():
    torch.manual_seed(0)
    return HMSTLanguageModel(vocab_size=259, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=32, n_experts=4, top_k=2,
                      exit_layer=1, ssm_d_state=4, ssm_expand=1, mem_top_k=2, mem_max_items=1000, mem_write_stride=2,
                      episodic_capacity=16, controller_hidden=16, critic_d_model=16, critic_layers=1, critic_heads=2,
                      critic_max_len=32, optimizer=OptimizerConfig(warmup_steps=1),
                      gate_schedule={"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.5, "expert_bias": 0.5})

def make_trainer():
    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_steps=4,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, use_distributed_sampler=False)

def sha(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()

def episodic_sha(module):
    return {k: sha(v) for k, v in module.episodic.state_dict().items()}

m = build()
m.set_tokenizer(build_tokenizer("byte", [], 259))
trainer = make_trainer()
trainer.fit(m, datamodule=Streams())
rank = trainer.global_rank
n_trained = len(m.semantic)
# each rank ingests its own document (different lengths): one collective write, replicated everywhere
ingested = m.ingest(("rank zero text. " * 3) if rank == 0 else "the other rank's longer document, " * 5)
trainer.save_checkpoint(os.path.join(OUT, "last.ckpt"))  # every rank takes part (the TBPTT all-gather)
# a fresh module resumes from the checkpoint on both ranks: each must get its own episodic store back
m2 = build()
t2 = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_steps=4, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               limit_val_batches=0, use_distributed_sampler=False)
t2.fit(m2, datamodule=Streams(), ckpt_path=os.path.join(OUT, "last.ckpt"))
sd = m.semantic.state_dict()
ids = sd["ids"]
probe = m.semantic.search(torch.randn(8, 32, generator=torch.Generator().manual_seed(7)), 3)
report = {
    "rank": trainer.global_rank,
    "n": len(m.semantic),
    "ids": ids.tolist(),
    "index_sha": hashlib.sha256(sd["index"].numpy().tobytes()).hexdigest(),
    "values_sha": hashlib.sha256(sd["values"].numpy().tobytes()).hexdigest(),
    "texts_sha": hashlib.sha256(sd["texts"].encode()).hexdigest(),
    "probe_ids": probe.ids.tolist(),
    "weights_sha": hashlib.sha256(torch.cat([p.detach().flatten() for p in m.parameters()]).numpy().tobytes()).hexdigest(),
    "n_trained": n_trained,
    "n_ingested": len(ingested),
    "episodic": episodic_sha(m),
    "episodic_written": m.episodic.written,
    "restored_episodic": episodic_sha(m2),
    "restored_semantic_sha": sha(m2.semantic.state_dict()["index"]),
    "ssm_sha": {k: sha(v) for k, v in m.state_to_dict(m.carried_state).items()},
    "restored_ssm_sha": None if m2.carried_state is None else {k: sha(v) for k, v in m2.state_to_dict(m2.carried_state).items()},
}
with open(os.path.join(OUT, f"rank{trainer.global_rank}.json"), "w") as f:
    json.dump(report, f)
'''


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_process_ddp_keeps_semantic_memory_identical(tmp_path):
    script = tmp_path / "hmst_ddp_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MEMLM_QUIET="1")
    env.pop("MEMLM_RUN_DIR", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # 4 steps x 2 ranks x (2 rows x 8 written tokens) items, then both ranks' ingested documents,
    # same ids/keys/values/texts everywhere
    assert r0["n_trained"] == r1["n_trained"] == 4 * 2 * 2 * 8
    assert r0["n_ingested"] != r1["n_ingested"] and min(r0["n_ingested"], r1["n_ingested"]) > 0
    assert r0["n"] == r1["n"] == r0["n_trained"] + r0["n_ingested"] + r1["n_ingested"]
    assert r0["ids"] == r1["ids"] == list(range(r0["n"]))
    for key in ("index_sha", "values_sha", "texts_sha", "probe_ids", "weights_sha"):
        assert r0[key] == r1[key], key
    # the carried SSM state is rank-local: the checkpoint keeps every rank's, indexed by global rank
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["tbptt"]
    assert saved["has_state"] and saved["world_size"] == 2
    ssm = saved["tensors"]["ssm.0.ssm"]
    assert ssm.shape[:2] == (2, 2) and not torch.allclose(ssm[0], ssm[1])  # [rank, row, ...]
    assert saved["tensors"]["pos"].tolist() == [64, 64]
    # the episodic store is rank-local: the ranks saw different streams, so their stores differ,
    # and after a resume each rank holds exactly its own store again (not rank 0's)
    assert r0["episodic_written"] == r1["episodic_written"] == 4 * 2
    assert r0["episodic"]["pooled"] != r1["episodic"]["pooled"]
    for r in (r0, r1):
        assert r["restored_episodic"] == r["episodic"]
        assert r["restored_ssm_sha"] == r["ssm_sha"]  # and its own carried SSM state
        assert r["restored_semantic_sha"] == r0["index_sha"]
    saved_eps = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["hmst_memory"]
    assert saved_eps["episodic_ranks"]["world_size"] == 2
    assert saved_eps["episodic_ranks"]["tensors"]["pooled"].shape[0] == 2
    assert torch.equal(saved_eps["episodic_ranks"]["tensors"]["pooled"][0], saved_eps["episodic"]["pooled"])
