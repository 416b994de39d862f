"""Memory pre-flight: the estimate, the error past the limit, the warning near it, the override."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memlm.apps import preflight
from memlm.core.errors import MemLMError
from memlm.lightning_modules.transformer import TransformerLM

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


def _gpt():
    with torch.device("meta"):
        return TransformerLM(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16)


def test_estimate_by_hand():
    m = _gpt()
    n = sum(p.numel() for p in m.parameters())
    est = preflight.estimate(m, batch_size=4, block_size=32, precision="32-true")
    assert (est.weights, est.gradients, est.optimizer) == (4 * n, 4 * n, 8 * n)
    tokens = 4 * 32
    assert est.activations == 2 * tokens * (34 * 16 + 5 * 2 * 32) * 4 + 3 * tokens * 100 * 4
    half = preflight.estimate(m, 4, 32, precision="bf16-mixed")
    assert half.weights == est.weights and half.activations < est.activations
    fsdp = preflight.estimate(m, 4, 32, strategy="fsdp", world_size=4)
    assert fsdp.optimizer == est.optimizer / 4


def test_check_errors_past_the_limit_warns_near_it_and_can_be_skipped():
    est = preflight.MemoryEstimate(weights=8 * GIB, gradients=8 * GIB, optimizer=16 * GIB, activations=0)
    with pytest.raises(MemLMError) as info:
        preflight.check(est, free=20 * GIB, where="RAM")
    msg = str(info.value)
    assert "32.0 GiB" in msg and "20.0 GiB" in msg and "bf16-mixed" in msg and "--run.skip_memory_check" in msg
    assert "\n" not in msg
    assert preflight.check(est, free=20 * GIB, where="RAM", override=True) is None
    assert preflight.check(est, free=36 * GIB, where="RAM").startswith("warning:")
    assert preflight.check(est, free=100 * GIB, where="RAM") is None
    # two CPU ranks on one host share its RAM
    with pytest.raises(MemLMError):
        preflight.check(est, free=50 * GIB, where="RAM", devices_here=2)


def test_a_config_too_large_for_this_machine_stops_before_allocating(tmp_path):
    # hmst_base is 12B parameters: ~180 GiB of weights, gradients and AdamW state on a CPU
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "hmst_base.yaml"),
           "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
           "--data.init_args.source=builtin", "--data.init_args.batch_size=1", "--run.root", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "MEMLM_QUIET": "1"})
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith("error: this run needs about") and "GiB" in lines[-1]
    assert "Traceback" not in proc.stderr
