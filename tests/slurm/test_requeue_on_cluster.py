"""scripts/slurm/train.sbatch on a real (local, one-node) Slurm cluster: a 2-task CPU DDP run
is signalled for requeue mid-run, comes back, and ends exactly where an uninterrupted run ends.

The requeued attempt must resume from the requeue checkpoint (step 7), not from the older
last.ckpt (step 5, the last validation) and not from scratch; its loss curve (metrics.csv,
appended across attempts) must equal the uninterrupted run's, step for step; and both
attempts must log to the same offline W&B run.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
CONFIG = ROOT / "configs" / "transformer_micro.yaml"
MAX_STEPS, VAL_EVERY, HOLD_AT = 12, 5, 7
TINY = [
    f"--trainer.max_steps={MAX_STEPS}", f"--trainer.val_check_interval={VAL_EVERY}",
    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
    "--model.init_args.block_size=32", "--data.init_args.tokenizer=char", "--data.init_args.block_size=32",
    "--data.init_args.batch_size=4", "--data.init_args.max_val_batches=1", "--data.init_args.steps_per_epoch=5",
]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _job_env(memlm_cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MEMLM_RUN_DIR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    env.update({
        "MEMLM_REPO": str(ROOT), "PYTHON": sys.executable, "MEMLM_CACHE": str(memlm_cache),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)]),
        "OMP_NUM_THREADS": "1", "MEMLM_QUIET": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
    })
    return env


def _submit(cluster, workdir: Path, env: dict, hold_at: int, *extra: str) -> str:
    hold = json.dumps({"class_path": "slurm_pace.HoldForRequeue", "init_args": {"hold_at": hold_at}})
    return cluster.sbatch(
        "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:10:00", f"--chdir={workdir}",
        f"--output={workdir}/slurm-%j.out", str(SBATCH), str(CONFIG), *TINY, f"--run.root={workdir}/runs",
        f"--trainer.callbacks+={hold}", *extra, env=env,
    )


def _curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(fh) if r.get(key)]


def _wait_for(pred, what: str, cluster, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f} s\n{cluster.logs()}")
        time.sleep(0.3)


def _wandb_offline():
    from memlm.apps import wandb_offline

    return wandb_offline


def _output(workdir: Path, job: str) -> str:
    p = workdir / f"slurm-{job}.out"
    return p.read_text(errors="replace")[-4000:] if p.is_file() else "(no job output)"


def test_requeued_job_resumes_from_the_newest_checkpoint_and_matches_an_uninterrupted_run(
    slurm_cluster, memlm_cache, tmp_path
):
    env = _job_env(memlm_cache)
    t0 = time.monotonic()

    # -- the interrupted run: held at step 7 until the requeue signal arrives ------------
    work = tmp_path / "requeued"
    work.mkdir()
    job = _submit(slurm_cluster, work, env, HOLD_AT, "--run.logger=[csv,wandb]")
    run = work / "runs" / "transformer_micro" / f"slurm_{job}"
    _wait_for(lambda: all((run / f"holding-rank{r}").is_file() for r in (0, 1)), "ranks never reached the hold step",
              slurm_cluster)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == VAL_EVERY
    # What '#SBATCH --signal=SIGUSR1@90' does before the time limit: signal the job's steps.
    slurm_cluster.run("scancel", "--signal=USR1", job)
    t_signal = time.monotonic()

    info = slurm_cluster.wait(job, release_requeued=True)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _output(work, job)
    assert info["Restarts"] == "1"

    # -- the uninterrupted reference, same seed and settings -------------------------------
    t_done = time.monotonic()
    ref_work = tmp_path / "reference"
    ref_work.mkdir()
    ref_job = _submit(slurm_cluster, ref_work, env, 0, "--run.logger=[csv]")
    ref_info = slurm_cluster.wait(ref_job)
    assert ref_info["JobState"] == "COMPLETED" and ref_info["Restarts"] == "0", _output(ref_work, ref_job)
    ref = ref_work / "runs" / "transformer_micro" / f"slurm_{ref_job}"

    # resumed from the requeue checkpoint (step 7), not from last.ckpt (step 5) or from scratch
    hpc = run / "hpc_ckpt_1.ckpt"
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert torch.load(hpc, weights_only=True)["global_step"] == HOLD_AT
    first = json.loads((run / "attempt-0.json").read_text())
    second = json.loads((run / "attempt-1.json").read_text())
    assert first["start_step"] == 0 and first["ckpt_path"] is None and first["world"] == 2
    assert second["start_step"] == HOLD_AT and Path(second["ckpt_path"]) == hpc and second["job"] == job
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == MAX_STEPS

    # one curve across both attempts, each step once, equal to the uninterrupted run
    curve, ref_curve = _curve(run, "train/loss"), _curve(ref, "train/loss")
    assert [s for s, _ in ref_curve] == list(range(MAX_STEPS))
    assert [s for s, _ in curve] == list(range(MAX_STEPS)), "a step was skipped or trained twice"
    for (step, loss), (_, ref_loss) in zip(curve, ref_curve):
        assert loss == pytest.approx(ref_loss, abs=1e-6), (step, loss, ref_loss)
    assert _curve(run, "val/loss") == pytest.approx(_curve(ref, "val/loss"), abs=1e-6)

    # both attempts wrote to the same (offline) W&B run: the id pinned in the run directory
    run_id = (run / "wandb_run_id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), [p.name for p in offline]
    wb = _wandb_offline()
    files = [p / f"run-{run_id}.wandb" for p in offline]
    assert {r.run.run_id for f in files for r in wb.wandb_records(f) if r.WhichOneof("record_type") == "run"} == {run_id}
    # the first attempt logged steps 0-6, the requeued one continues at 7 (not from 0)
    assert sorted(set(wb.history_steps(files[0]))) == list(range(HOLD_AT))
    deadline = time.monotonic() + 60  # the second attempt's writer may still be flushing on a loaded machine
    while not wb.history_steps(files[1]) and time.monotonic() < deadline:
        time.sleep(1)
    assert sorted(set(wb.history_steps(files[1]))) == list(range(HOLD_AT, MAX_STEPS))
    print(f"\nslurm requeue: signal after {t_signal - t0:.0f} s, requeued job done {t_done - t_signal:.0f} s later, "
          f"reference run {time.monotonic() - t_done:.0f} s")
