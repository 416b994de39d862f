"""Test-wide settings: offline, quiet, a private cache, deterministic CPU threads."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Never touch the network from tests: hubs offline, W&B offline and silent.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MEMLM_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Deterministic CPU threads: test models are tiny, where intra-op threads only add spin
# contention (28x slower generation measured on a loaded 2-core machine). Subprocesses
# (DDP, CLI error tests) inherit OMP_NUM_THREADS. Override with MEMLM_TEST_THREADS=N.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("MEMLM_TEST_THREADS", "1"))

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(int(os.environ.get("MEMLM_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def memlm_cache(tmp_path_factory) -> Path:
    """One token/tokenizer cache shared by the whole session (tokenizing is the slow part)."""
    path = tmp_path_factory.mktemp("memlm-cache")
    os.environ["MEMLM_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_run_env(monkeypatch):
    # A run directory set by one CLI test must not leak into the next.
    monkeypatch.delenv("MEMLM_RUN_DIR", raising=False)
    yield
