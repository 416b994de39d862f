"""Stage 4 through a real Trainer: only the critic trains, on the triples, and validation reports AUROC/ECE."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from memlm.callbacks.critic_stage import CriticStage
from memlm.core.errors import MemLMError
from memlm.core.tokenizer import build_tokenizer
from memlm.datamodules.critic_data import encode_examples, make_critic_examples
from memlm.lightning_modules.hmst.module import HMSTLanguageModel


def module(**kw):
    torch.manual_seed(0)
    m = HMSTLanguageModel(vocab_size=259, block_size=32, n_layer=2, n_head=2, d_model=16, d_ff=16, n_experts=2, top_k=1,
                          exit_layer=1, ssm_d_state=4, ssm_expand=1, episodic_capacity=8, controller_hidden=8,
                          critic_d_model=16, critic_layers=1, critic_heads=2, critic_max_len=128,
                          optimizer={"learning_rate": 3e-3, "warmup_steps": 0}, **kw)
    m.set_tokenizer(build_tokenizer("byte"))
    return m


def loader(split, n=12):
    tok = build_tokenizer("byte")
    return DataLoader(make_critic_examples(n, 0, split), batch_size=8,
                      collate_fn=lambda xs: encode_examples(xs, tok, tok.pad_id))


def save(m, path):
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def test_stage4_trains_only_the_critic_and_reports_auroc_and_ece(tmp_path):
    ckpt = save(module(), tmp_path / "s1.ckpt")
    m = module()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[CriticStage(init_checkpoint=ckpt)], val_check_interval=3,
                        check_val_every_n_epoch=None)
    trainer.fit(m, train_dataloaders=loader("train", 24), val_dataloaders=loader("eval"))
    start = torch.load(ckpt, weights_only=True)["state_dict"]
    changed = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert changed and all(n.startswith("model.critic.") for n in changed)
    metrics = trainer.callback_metrics
    for key in ("val/critic_auroc", "val/critic_ece", "val/critic_loss", "val/critic_acc"):
        assert key in metrics
    assert 0.0 <= float(metrics["val/critic_ece"]) <= 1.0 and "val/loss" not in metrics


def test_stage4_needs_triples_and_a_checkpoint(tmp_path):
    m = module()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[CriticStage()])
    with pytest.raises(MemLMError, match="init_checkpoint"):
        trainer.fit(m, train_dataloaders=loader("train"))
    ckpt = save(module(), tmp_path / "s1.ckpt")
    m = module()
    lm = [{"input_ids": torch.zeros(8, dtype=torch.long), "targets": torch.zeros(8, dtype=torch.long)}] * 4
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[CriticStage(ckpt)])
    with pytest.raises(MemLMError, match="CriticDataModule"):
        trainer.fit(m, train_dataloaders=DataLoader(lm, batch_size=2))


def test_stage4_may_add_the_critics_match_channel_and_nothing_else(tmp_path):
    """A stage-1 checkpoint without exact-match flags starts a stage-4 critic with them (the
    channel starts fresh and trains); any other parameter the checkpoint lacks is an error."""
    ckpt = save(module(), tmp_path / "s1.ckpt")
    m = module(critic_match_ngram=2)
    fresh = m.model.critic.match.weight.detach().clone()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[CriticStage(init_checkpoint=ckpt)], limit_val_batches=0)
    trainer.fit(m, train_dataloaders=loader("train", 24))
    assert not torch.equal(m.model.critic.match.weight.detach(), fresh)
    start = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(m.state_dict()["model.wte.weight"], start["model.wte.weight"])
    partial = {k: v for k, v in start.items() if not k.startswith("model.controller.")}
    bad = save(module(), tmp_path / "partial.ckpt")
    torch.save({**torch.load(bad, weights_only=True), "state_dict": partial}, bad)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[CriticStage(bad)])
    with pytest.raises(MemLMError, match="does not fit"):
        trainer.fit(module(critic_match_ngram=2), train_dataloaders=loader("train"))
