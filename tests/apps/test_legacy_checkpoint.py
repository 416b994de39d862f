"""A checkpoint written before the packages moved under ``memlm.`` still loads and computes the same.

``tests/fixtures/legacy_transformer_v0.ckpt`` was written by the pre-move code (class path
``lightning_modules.transformer.TransformerLM``); the logits beside it were computed then.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from memlm.checkpoint import load_module, upgrade_class_path
from memlm.core.checkpoint_io import read_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_old_class_paths_map_to_the_new_packages():
    assert upgrade_class_path("lightning_modules.transformer.TransformerLM") == "memlm.lightning_modules.transformer.TransformerLM"
    assert upgrade_class_path("memlm.lightning_modules.hmst.module.HMSTLanguageModel") == "memlm.lightning_modules.hmst.module.HMSTLanguageModel"


def test_pre_move_checkpoint_loads_and_gives_the_same_logits():
    path = FIXTURES / "legacy_transformer_v0.ckpt"
    assert read_checkpoint(path)["memlm"]["class_path"] == "lightning_modules.transformer.TransformerLM"
    module = load_module(path)
    assert type(module).__module__ == "memlm.lightning_modules.transformer"
    with torch.no_grad():
        logits = module(torch.tensor([[1, 2, 3, 4, 5]])).logits[0, -1, :8]
    expected = torch.tensor(json.loads((FIXTURES / "legacy_transformer_v0.logits.json").read_text()))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
