"""Progress output: a step-based bar in a terminal, plain periodic lines in a log file."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

from memlm.callbacks.progress import StepProgress, format_duration

ROOT = Path(__file__).resolve().parents[2]


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return (self.w(batch["input_ids"].float()) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (self.w(batch["input_ids"].float()) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(progress: StepProgress, max_steps=6, val_every=None):
    data = [{"input_ids": torch.ones(2, 4, dtype=torch.long)} for _ in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[progress], accelerator="cpu", num_sanity_val_steps=0,
                        val_check_interval=val_every, limit_val_batches=1 if val_every else 0)
    trainer.fit(_Tiny(), loader, loader if val_every else None)


def test_log_file_mode_prints_a_line_every_n_steps_with_step_loss_rate_and_eta():
    out = io.StringIO()
    _fit(StepProgress(every_n_steps=2, every_s=1e9, stream=out, tty=False), max_steps=6, val_every=3)
    lines = out.getvalue().splitlines()
    train = [ln for ln in lines if ln.startswith("[train]")]
    assert [ln.split(" | ")[0] for ln in train] == ["[train] step 2/6", "[train] step 4/6", "[train] step 6/6"]
    assert all(" | loss " in ln and "tok/s" in ln and "elapsed" in ln and "eta" in ln for ln in train)
    assert train[-1].endswith("eta 0:00")
    assert [ln.split(" | ")[0] for ln in lines if ln.startswith("[val]")] == ["[val] step 3", "[val] step 6"]
    assert "\r" not in out.getvalue() and "Epoch" not in out.getvalue()


def test_log_file_mode_also_prints_by_time():
    out = io.StringIO()
    _fit(StepProgress(every_n_steps=10_000, every_s=0.0, stream=out, tty=False), max_steps=3)
    assert len([ln for ln in out.getvalue().splitlines() if ln.startswith("[train]")]) == 3


def test_terminal_mode_redraws_one_step_bar_without_epochs():
    out = io.StringIO()
    _fit(StepProgress(refresh_s=0.0, stream=out, tty=True), max_steps=4)
    text = out.getvalue()
    frames = [f for f in text.split("\r") if f]
    assert frames[-1].startswith("step 4/4 [####################] loss ")
    assert "step 1/4 [#####---------------]" in text
    assert "Epoch" not in text and "-2" not in text


def test_format_duration():
    assert (format_duration(5), format_duration(65), format_duration(3700), format_duration(None)) == ("0:05", "1:05", "1:01:40", "?")


def test_progress_lines_appear_in_a_log_file_while_the_run_goes_on(tmp_path, memlm_cache):
    log = tmp_path / "train.log"
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "transformer_micro.yaml"),
           "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=16",
           "--model.init_args.block_size=16", "--data.init_args.tokenizer=char", "--data.init_args.block_size=16",
           "--data.init_args.batch_size=2", "--data.init_args.max_val_batches=1", "--trainer.max_steps=400",
           "--trainer.val_check_interval=400", "--run.progress_every_n_steps=5", "--run.root", str(tmp_path / "runs"),
           "--run.logger=[csv]"]
    env = {**os.environ, "MEMLM_QUIET": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
        seen_while_running = False
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if "[train] step 5/400" in log.read_text():
                seen_while_running = proc.poll() is None
                break
            time.sleep(0.1)
        proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert seen_while_running, "no progress line reached the log file before the run ended"
    assert "[train] step 400/400" in text and "Epoch" not in text
