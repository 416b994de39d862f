"""Memory-analysis images and gate statistics reach the W&B run as media and histograms: real
fits (offline W&B), read back from the run file and its media folder."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest

from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI
from memlm.apps.wandb_offline import history_rows, offline_run_file, records_when_closed

wandb = pytest.importorskip("wandb")
ROOT = Path(__file__).resolve().parents[2]
SMALL_DATA = ["--data.init_args.tokenizer=char", "--data.init_args.block_size=32", "--data.init_args.batch_size=2",
              "--data.init_args.max_val_batches=1", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--run.logger=[wandb]", "--trainer.val_check_interval=1000"]


def fit_offline(tmp_path: Path, config: str, *overrides: str) -> tuple[Path, list[dict]]:
    """Fit with offline W&B; the run's files folder and its history rows."""
    argv = ["fit", "--config", str(ROOT / "configs" / config), "--run.root", str(tmp_path), *SMALL_DATA, *overrides]
    try:
        cli = MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        wandb.finish()
    path = offline_run_file(cli.run_dir)
    records_when_closed(path)
    return path.parent / "files", history_rows(path)


def test_hamt_memory_images_and_gate_histograms_reach_the_run(tmp_path, memlm_cache):
    files, rows = fit_offline(
        tmp_path, "hamt_micro.yaml", "--trainer.max_steps=4", "--model.init_args.n_layer=2", "--model.init_args.n_embd=32",
        "--model.init_args.n_slots=4", "--model.init_args.scan_chunk=16",
        "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.plot_every_n_steps=2")
    hists = [(r["trainer/global_step"], r["memory_analysis/L1/write_gates"]) for r in rows if "memory_analysis/L1/write_gates" in r]
    assert [s for s, _ in hists] == [0, 2], hists
    for _, h in hists:
        assert h["_type"] == "histogram" and len(h["bins"]) == len(h["values"]) + 1 and sum(h["values"]) > 0
    assert hists[0][1]["bins"] != hists[1][1]["bins"], "the step-2 histogram shows the trained gates, not a copy"
    for key in ("slot_norms", "gates", "utilisation_fidelity_gates"):
        images = [(r["trainer/global_step"], r[f"memory_analysis/{key}"]) for r in rows if f"memory_analysis/{key}" in r]
        assert [s for s, _ in images] == [2], (key, images)  # rendered at step 2, not again at fit end
        [(_, image)] = images
        assert image["_type"] == "images/separated" and image["count"] == 1
        media = files / image["filenames"][0]
        assert media.is_file() and media.read_bytes()[:4] == b"\x89PNG", media


@pytest.mark.parametrize("explicit", [True, False], ids=["every-2-steps", "cli-default"])
def test_hmst_gate_probabilities_go_out_as_histograms(tmp_path, memlm_cache, explicit):
    # without the explicit callback, MemLMCLI adds GateHistograms() (every 50 steps) to HMST runs
    callback = ["--trainer.callbacks+=memlm.callbacks.histograms.GateHistograms", "--trainer.callbacks.every_n_steps=2"]
    _, rows = fit_offline(
        tmp_path, "hmst_micro.yaml", "--trainer.max_steps=3", "--model.init_args.n_layer=2",
        "--model.init_args.d_model=32", "--model.init_args.n_head=2", "--model.init_args.d_ff=48",
        "--model.init_args.exit_layer=1", "--model.init_args.block_size=32", *(callback if explicit else []))
    rows = [r for r in rows if "gates/p_semantic" in r]
    assert [r["trainer/global_step"] for r in rows] == ([1, 3] if explicit else [1])
    for r in rows:
        for key in ("gates/p_exit", "gates/p_episodic", "gates/p_semantic", "gates/p_verify", "gates/p_expert_bias",
                    "gates/expert_choice"):
            assert r[key]["_type"] == "histogram" and sum(r[key]["values"]) == 2, (key, r[key])  # one per batch row


def test_offline_preview_draws_the_runs_scalars_histograms_and_images(tmp_path, memlm_cache):
    from memlm.apps import wandb_preview

    files, _ = fit_offline(tmp_path, "hamt_micro.yaml", "--trainer.max_steps=4", "--model.init_args.n_layer=1",
                           "--model.init_args.n_embd=32", "--model.init_args.n_slots=4", "--trainer.log_every_n_steps=1",
                           "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.plot_every_n_steps=2")
    run = wandb_preview.collect(wandb_preview.find_run(files.parents[1]))  # <run dir>/wandb
    assert run["group"] == "HAMTLanguageModel" and "size:micro" in run["tags"]
    assert [s for s, _ in run["scalars"]["train/loss"]] == [0, 1, 2, 3]
    assert set(run["histograms"]) == {"memory_analysis/L0/write_gates"}
    assert set(run["images"]) == {f"memory_analysis/{k}" for k in ("slot_norms", "gates", "utilisation_fidelity_gates")}
    out = tmp_path / "preview.png"
    panels = wandb_preview.render(run, out, "test")
    assert panels[-3:] == sorted(run["images"]) and "train/loss" in panels
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(wandb_preview.MemLMError, match="no offline W&B run"):
        wandb_preview.find_run(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)
