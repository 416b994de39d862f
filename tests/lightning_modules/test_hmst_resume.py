"""HMST resume equality: 4 steps + resume to 8 == 8 uninterrupted steps (stream sampler, CPU).

HMST carries, between training steps, the Mamba state of every stream row and the previous
segment's pooled state (``carried_state``, saved per rank in ``checkpoint["tbptt"]`` through
:class:`memlm.core.state.RecurrentState`), its semantic and episodic stores and the generator
its training gates are sampled from (``checkpoint["hmst_memory"]``). The text is cut so that an
epoch holds 6 chunks of 2 streams: the resume point (after step 4) is in the middle of the
streams, steps 5-6 must continue them with the restored state, and step 7 starts epoch 1 afresh.

Before the protocol the carried state was not in the checkpoint and the gates came from the
global RNG, which a resume does not restore; the controls at the end (the same checkpoint
without ``tbptt``, or without the gate generator state) show that step 5 then differs.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "hmst_micro.yaml"
# 280 characters: train 210 (2 streams x 105 -> 6 chunks of 16), val 56, test 14
TEXT = ("the cat sat on the mat and the dog ran to the park; " * 6)[:280]
ARGS = [
    "--model.init_args.block_size=16", "--model.init_args.n_layer=2", "--model.init_args.n_head=2",
    "--model.init_args.d_model=32", "--model.init_args.d_ff=32", "--model.init_args.n_experts=4",
    "--model.init_args.exit_layer=1", "--model.init_args.ssm_d_state=4", "--model.init_args.mem_top_k=2",
    "--model.init_args.mem_query_stride=2", "--model.init_args.mem_max_items=256", "--model.init_args.mem_write_stride=4",
    "--model.init_args.mem_text_tokens=8", "--model.init_args.episodic_capacity=8", "--model.init_args.controller_hidden=16",
    "--model.init_args.critic_d_model=16", "--model.init_args.critic_heads=2", "--model.init_args.critic_max_len=32",
    "--model.init_args.optimizer.warmup_steps=2", "--model.init_args.optimizer.max_steps=8",
    # no early exit, so every row reads its carried SSM state; the other gates are random, so
    # the resumed run must also reproduce the gate samples
    "--model.init_args.gate_schedule={exit: 0.0, episodic: 1.0, semantic: 0.7, verify: 0.5, expert_bias: 0.5}",
    "--data.init_args.source=files", "--data.init_args.tokenizer=char", "--data.init_args.block_size=16",
    "--data.init_args.batch_size=2", "--data.init_args.val_fraction=0.2", "--data.init_args.test_fraction=0.05",
    "--data.init_args.max_val_batches=1",
    "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]


def fit(root: Path, version: str, max_steps: int, *extra: str) -> MemLMCLI:
    argv = ["fit", "--config", str(CONFIG), "--run.root", str(root), "--run.logger=[csv]", "--run.name=hmst_resume",
            f"--run.version={version}", f"--trainer.max_steps={max_steps}",
            f"--data.init_args.files=[{root / 'text.txt'}]", *ARGS, *extra]
    try:
        return MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


def losses(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(fh) if r.get(key)}


def test_hmst_resume_continues_the_uninterrupted_run(tmp_path, memlm_cache):
    (tmp_path / "text.txt").write_text(TEXT)
    a = fit(tmp_path, "a", 8)
    b1 = fit(tmp_path, "b", 4)
    last = b1.run_dir / "checkpoints" / "last.ckpt"
    assert b1.trainer.global_step == 4 and last.is_file()
    raw = torch.load(last, map_location="cpu", weights_only=True)  # tensors only
    saved = raw["tbptt"]
    assert saved["has_state"] and saved["world_size"] == 1
    assert int(saved["tensors"]["pos"][0]) == 4 * 16  # mid-stream: 4 of the epoch's 5 chunks read
    assert torch.equal(saved["tensors"]["ssm.0.ssm"][0], b1.model.carried_state.ssm[0][1])
    assert raw["hmst_memory"]["gate_rng"].dtype == torch.uint8
    control_dir = b1.run_dir.parent / "control"
    shutil.copytree(b1.run_dir, control_dir)

    b2 = fit(tmp_path, "b", 8, "--ckpt_path=last")
    assert b2.trainer.global_step == 8 and b2.trainer.current_epoch == a.trainer.current_epoch
    ref = losses(a.run_dir, "train/loss")
    resumed = losses(b2.run_dir, "train/loss")
    assert sorted(ref) == list(range(8))
    epochs = losses(a.run_dir, "epoch")
    assert (epochs[5], epochs[6]) == (0, 1)  # the continued run crosses an epoch boundary
    for step in range(8):
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), (step, resumed[step], ref[step])
    assert losses(b2.run_dir, "val/loss")[5] == pytest.approx(losses(a.run_dir, "val/loss")[5], abs=1e-6)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b2.model.state_dict()[k], v, rtol=0, atol=1e-6)
    for k, v in a.model.state_to_dict(a.model.carried_state).items():
        torch.testing.assert_close(b2.model.state_to_dict(b2.model.carried_state)[k], v, rtol=0, atol=1e-6)
    assert len(b2.model.semantic) == len(a.model.semantic) and len(b2.model.episodic) == len(a.model.episodic)

    # controls: the same checkpoint without the carried state, or without the gate generator
    # state (what a resume had before) -> step 5 no longer matches
    for name, drop in (("no_state", lambda ck: ck.pop("tbptt")), ("no_gate_rng", lambda ck: ck["hmst_memory"].pop("gate_rng"))):
        shutil.copytree(control_dir, control_dir.parent / name)
        ckpt = control_dir.parent / name / "checkpoints" / "last.ckpt"
        stripped = torch.load(ckpt, map_location="cpu", weights_only=True)
        drop(stripped)
        torch.save(stripped, ckpt)
        c = fit(tmp_path, name, 5, "--ckpt_path=last")
        assert c.trainer.global_step == 5
        assert abs(losses(c.run_dir, "train/loss")[4] - ref[4]) > 1e-6, name  # fails the equality above
