"""The ``optimizer`` group: one OptimizerConfig for every gradient-trained module, stored plain in
checkpoints, older flat hyperparameters folded into it, and the settings reaching AdamW."""
from __future__ import annotations

import io

import pytest
import torch

from memlm.core.errors import MemLMError
from memlm.lightning_modules.hamt.module import HAMTLanguageModel
from memlm.lightning_modules.language_model import OptimizerConfig, fold_legacy_optimizer_hparams
from memlm.lightning_modules.transformer import TransformerLM

TINY = dict(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)


def test_hparams_hold_the_group_as_a_plain_dict_that_loads_without_pickle():
    cfg = OptimizerConfig(learning_rate=1e-3, betas=(0.8, 0.9), warmup_steps=4, max_steps=20)
    module = TransformerLM(**TINY, optimizer=cfg)
    stored = dict(module.hparams)["optimizer"]
    assert stored == {"learning_rate": 1e-3, "weight_decay": 0.1, "betas": [0.8, 0.9], "warmup_steps": 4,
                      "max_steps": 20, "min_lr_ratio": 0.1}
    assert dict(module.hparams_initial)["optimizer"] == stored  # what the loggers' hparams.yaml gets
    buf = io.BytesIO()
    torch.save({"hyper_parameters": dict(module.hparams)}, buf)
    buf.seek(0)
    hparams = torch.load(buf, weights_only=True)["hyper_parameters"]
    rebuilt = TransformerLM(**hparams)
    assert rebuilt.optimizer_config == cfg


def test_a_partial_dict_fills_its_gaps_from_the_class_default():
    hamt = HAMTLanguageModel(vocab_size=16, n_layer=1, n_embd=16, n_slots=2, optimizer={"warmup_steps": 1})
    assert hamt.optimizer_config == OptimizerConfig(learning_rate=1e-3, warmup_steps=1)  # HAMT's default rate
    assert hamt.hparams["optimizer"]["learning_rate"] == 1e-3
    with pytest.raises(MemLMError, match="unknown model.optimizer settings"):
        TransformerLM(**TINY, optimizer={"lr": 1e-3})


def test_legacy_flat_keys_fold_into_the_group():
    flat = {"vocab_size": 16, "n_layer": 1, "learning_rate": 3e-3, "betas": [0.9, 0.99], "max_steps": None}
    folded = fold_legacy_optimizer_hparams(flat)
    assert folded == {"vocab_size": 16, "n_layer": 1,
                      "optimizer": {"learning_rate": 3e-3, "betas": [0.9, 0.99], "max_steps": None}}
    assert fold_legacy_optimizer_hparams(folded) == folded  # already current: unchanged
    assert TransformerLM.upgrade_hparams(flat) == folded


def test_the_group_reaches_adamw_and_the_schedule():
    module = TransformerLM(**TINY, optimizer=OptimizerConfig(learning_rate=2e-3, weight_decay=0.05, betas=(0.8, 0.9),
                                                             warmup_steps=2, max_steps=10, min_lr_ratio=0.5))
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert opt.defaults["betas"] == (0.8, 0.9)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(2e-3)  # linear warmup over 2 steps
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # cosine floor: min_lr_ratio * learning_rate
