"""scripts/slurm/train.sbatch rendered for 4 nodes x 8 GPUs, with ``srun`` replaced by a stub
that records its command line (no cluster needed): one task per GPU, every node and GPU
handed to Lightning, the run directory pinned to the job id so a requeue resumes in place."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"


def render(tmp_path: Path, env: dict[str, str], *args: str) -> list[str]:
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    stub.chmod(0o755)
    out = tmp_path / "srun_args"
    base = {"PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "SRUN_ARGS": str(out), "SLURM_SUBMIT_DIR": str(tmp_path)}
    subprocess.run(["bash", str(SBATCH), *args], env={**base, **env}, check=True, timeout=30, capture_output=True)
    return out.read_text().splitlines()


def test_four_nodes_of_eight_gpus(tmp_path):
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_PER_NODE": "8",
           "MEMLM_REPO": str(ROOT)}
    argv = render(tmp_path, env, "configs/hmst_small.yaml", "--trainer.max_steps=10")
    assert argv[:4] == ["python", f"{ROOT}/train.py", "fit", "--config"] and argv[4] == "configs/hmst_small.yaml"
    for flag in ("--trainer.accelerator=gpu", "--trainer.num_nodes=4", "--trainer.devices=8", "--trainer.strategy=ddp",
                 "--run.name=hmst_small", "--run.version=slurm_4242"):
        assert flag in argv, (flag, shlex.join(argv))
    assert argv[-1] == "--trainer.max_steps=10", "user overrides come last so they win"
    assert (tmp_path / "runs").is_dir()


def test_cpu_job_without_gpus(tmp_path):
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", "PYTHON": "/opt/py/bin/python3"}
    argv = render(tmp_path, env, "configs/transformer_micro.yaml")
    assert argv[:2] == ["/opt/py/bin/python3", "./train.py"]
    assert "--trainer.accelerator=cpu" in argv and "--trainer.devices=2" in argv and "--trainer.num_nodes=1" in argv


def test_header_requests_requeue_and_an_early_signal():
    header = [ln for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header and "#SBATCH --open-mode=append" in header
    # the signal goes to the job steps (no "B:" prefix), where Lightning's ranks listen for it
    assert "#SBATCH --signal=SIGUSR1@90" in header


def test_a_config_with_its_own_strategy_keeps_it(tmp_path):
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_PER_NODE": "8"}
    fsdp = str(ROOT / "configs" / "hmst_base_fsdp.yaml")
    argv = render(tmp_path, env, fsdp)
    assert not any(a.startswith("--trainer.strategy") for a in argv), shlex.join(argv)
    # STRATEGY, or an override, still chooses
    assert "--trainer.strategy=deepspeed" in render(tmp_path, {**env, "STRATEGY": "deepspeed"}, fsdp)
    argv = render(tmp_path, env, fsdp, "--trainer.strategy=ddp")
    assert argv[-1] == "--trainer.strategy=ddp"
