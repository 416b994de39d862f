"""python -m memlm.apps.hamt_analyze: figures and summary for a saved HAMT checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from memlm.apps.hamt_analyze import analyze, main
from memlm.core.errors import MemLMError
from memlm.datamodules.recall import RecallDataModule
from memlm.lightning_modules.hamt.module import HAMTLanguageModel
from memlm.lightning_modules.language_model import OptimizerConfig

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(path: Path, decay: float, gate_bias: float) -> Path:
    L.seed_everything(0)
    dm = RecallDataModule(task="mqar", seq_len=16, eval_lengths=[16], num_kv_pairs=2, num_keys=8, num_values=8,
                          num_train=8, num_val=4, batch_size=4)
    module = HAMTLanguageModel(vocab_size=dm.vocab_size, n_layer=2, n_embd=16, n_slots=3,
                               optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(path.parent))
    trainer.fit(module, dm)
    with torch.no_grad():  # set what the analysis must report back
        for blk in module.model.blocks:
            blk.mem.decay_logit.fill_(torch.logit(torch.tensor(decay)).item())
            blk.mem.w_gate.bias.fill_(gate_bias)
    trainer.save_checkpoint(str(path))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("hamt_ckpts")
    return _checkpoint(d / "a.ckpt", decay=0.9, gate_bias=-4.0), _checkpoint(d / "b.ckpt", decay=0.99, gate_bias=4.0)


def test_analysis_writes_figures_and_reports_the_checkpoints_memory(ckpts, tmp_path):
    a = analyze(str(ckpts[0]), str(tmp_path / "a"), length=96, batch=2, chunk=32)
    b = analyze(str(ckpts[1]), str(tmp_path / "b"), length=96, batch=2, chunk=32)
    for out in (tmp_path / "a", tmp_path / "b"):
        for name in ("slot_norms.png", "gates.png", "fidelity.png"):
            assert (out / name).stat().st_size > 1000
        summary = json.loads((out / "summary.json").read_text())
        assert summary["positions"] == [32, 64, 96] and len(summary["layers"]) == 2
    assert a["layers"][0]["decay"] == pytest.approx([0.9] * 3, abs=1e-5)
    assert b["layers"][0]["decay"] == pytest.approx([0.99] * 3, abs=1e-5)
    # gate bias -4 vs +4: mostly closed vs mostly open write gates
    assert a["layers"][0]["gate_mean"] < 0.3 < 0.7 < b["layers"][0]["gate_mean"]
    assert a["layers"][0]["gate_frac_above_0.5"] < 0.5 < b["layers"][0]["gate_frac_above_0.5"]
    # slower decay and open gates accumulate larger slot states
    assert sum(b["layers"][0]["slot_norm_final"]) > sum(a["layers"][0]["slot_norm_final"])
    assert all(-1.0 <= layer["fidelity"] <= 1.0 for layer in a["layers"] + b["layers"])
    assert a["layers"][0]["fidelity"] != b["layers"][0]["fidelity"]


@pytest.mark.slow  # a fresh interpreter imports lightning and matplotlib
def test_analysis_command_line_reads_a_text_file(ckpts, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("k1 v2 k3 v4 . . k1 v2 " * 20)
    r = subprocess.run([sys.executable, "-m", "memlm.apps.hamt_analyze", "--ckpt", str(ckpts[0]), "--out",
                        str(tmp_path / "cli"), "--text", str(text), "--length", "64", "--batch", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "layer 1: gate mean" in r.stdout
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["source"] == str(text)


def test_analysis_errors_are_one_line_user_errors(ckpts, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("k1 v2 k3 v4 . . k1 v2 " * 20)
    with pytest.raises(MemLMError, match="fewer than"):
        main(["--ckpt", str(ckpts[0]), "--out", str(tmp_path / "cli2"), "--text", str(text), "--length", "4096"])
    with pytest.raises(MemLMError, match="checkpoint not found"):
        main(["--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "x")])
    with pytest.raises(MemLMError, match="--chunk must be positive"):
        main(["--ckpt", str(ckpts[0]), "--out", str(tmp_path / "x"), "--chunk", "0"])
