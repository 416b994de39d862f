"""Which checkpoint a (requeued) fit resumes from: the newest of hpc_ckpt_<n>.ckpt and last.ckpt."""
from __future__ import annotations

import os

import pytest
import torch

from memlm.callbacks.slurm_requeue import resume_checkpoint


def save(path, step: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {}}, path)
    return str(path)


@pytest.fixture
def in_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "memlm")


def test_requeued_job_takes_the_newest_hpc_checkpoint_over_a_stale_last(tmp_path, in_slurm):
    save(tmp_path / "checkpoints" / "last.ckpt", 5)
    save(tmp_path / "hpc_ckpt_1.ckpt", 3)
    newest = save(tmp_path / "hpc_ckpt_2.ckpt", 7)
    assert resume_checkpoint(tmp_path, None) == newest
    assert resume_checkpoint(tmp_path, "last") == newest  # --ckpt_path last would have lost 2 steps
    assert resume_checkpoint(tmp_path, "hpc") == newest


def test_last_wins_when_it_is_newer_than_the_hpc_checkpoint(tmp_path, in_slurm):
    # e.g. preempted without the signal after training on past the requeue checkpoint
    last = save(tmp_path / "checkpoints" / "last.ckpt", 10)
    save(tmp_path / "hpc_ckpt_1.ckpt", 7)
    assert resume_checkpoint(tmp_path, None) == last
    assert resume_checkpoint(tmp_path, "last") == last
    assert resume_checkpoint(tmp_path, "hpc").endswith("hpc_ckpt_1.ckpt")


def test_nothing_changes_without_an_hpc_checkpoint_or_for_explicit_paths(tmp_path, in_slurm):
    save(tmp_path / "checkpoints" / "last.ckpt", 5)
    assert resume_checkpoint(tmp_path, None) is None  # a fresh job starts fresh
    assert resume_checkpoint(tmp_path, "last") == "last"
    save(tmp_path / "hpc_ckpt_1.ckpt", 9)
    other = save(tmp_path / "elsewhere.ckpt", 1)
    assert resume_checkpoint(tmp_path, other) == other
    assert resume_checkpoint(tmp_path, "best") == "best"


def test_outside_slurm_an_unset_ckpt_path_still_starts_fresh(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    save(tmp_path / "hpc_ckpt_1.ckpt", 9)
    assert resume_checkpoint(tmp_path, None) is None
    assert resume_checkpoint(tmp_path, "last").endswith("hpc_ckpt_1.ckpt")
