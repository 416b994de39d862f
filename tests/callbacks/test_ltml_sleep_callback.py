"""LTMLSleep: when it consolidates, what it logs, and that training resumes unchanged after it."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from memlm.callbacks import ltml_sleep
from memlm.callbacks.ltml_sleep import LTMLSleep
from memlm.memory.ltml.store import Store

STATS = {"interactions": 4, "added": 2, "merged": 1, "superseded": 0, "archived": 3, "seconds": 0.5}


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(2, 1)
        self.training_flags: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.training_flags.append(self.training)
        return self.w(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def patch_sleep(monkeypatch):
    """Replace the consolidation by a recorder: (global step, store path, embedder's module) per call."""
    calls = []
    embedders = []

    def fake_embedder(spec, module=None):
        embedders.append((spec, module))
        return SimpleNamespace(module=module)

    def fake_sleep(store, embedder, config):
        assert isinstance(store, Store) and config.use_llm is False
        if embedder.module is not None:
            embedder.module.eval()  # embedding with the trained model switches it to eval
        calls.append(fake_sleep.trainer.global_step)
        return dict(STATS)

    monkeypatch.setattr(ltml_sleep, "get_embedder", fake_embedder)
    monkeypatch.setattr(ltml_sleep, "sleep", fake_sleep)
    return calls, embedders, fake_sleep


def fit(tmp_path, callback, fake, max_steps=5, **kw):
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        logger=CSVLogger(str(tmp_path), name="", version=""), log_every_n_steps=1, **kw)
    fake.trainer = trainer
    model = Tiny()
    data = torch.utils.data.DataLoader(torch.randn(40, 2), batch_size=2)
    trainer.fit(model, data, torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2))
    return model


def test_sleeps_every_n_steps_after_validation_and_at_the_end(tmp_path, monkeypatch):
    calls, embedders, fake = patch_sleep(monkeypatch)
    cb = LTMLSleep(str(tmp_path / "m.sqlite"), every_n_train_steps=2, on_validation_end=True, embedder="module")
    model = fit(tmp_path, cb, fake, val_check_interval=3, num_sanity_val_steps=1)
    assert calls == [2, 3, 4, 5]  # steps 2 and 4, the validation at step 3 (not the sanity check), the end
    assert len(embedders) == 1 and embedders[0] == ("module", model)  # built once, with the trained model
    assert all(model.training_flags)  # the model is back in training mode after each consolidation
    assert cb.last_stats == STATS
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("ltml/added")]
    assert [int(r["step"]) for r in rows] == calls
    assert {k for k in rows[0] if k.startswith("ltml/")} == {"ltml/interactions", "ltml/added", "ltml/merged",
                                                              "ltml/superseded", "ltml/archived"}
    assert float(rows[0]["ltml/archived"]) == 3.0


def test_only_at_train_end_by_default_and_never_off_rank_zero(tmp_path, monkeypatch):
    calls, embedders, fake = patch_sleep(monkeypatch)
    fit(tmp_path, LTMLSleep(str(tmp_path / "m.sqlite"), embedder="hash"), fake, val_check_interval=2)
    assert calls == [5] and embedders == [("hash", None)]
    calls.clear()
    fit(tmp_path / "off", LTMLSleep(str(tmp_path / "m.sqlite"), on_train_end=False), fake)
    assert calls == []
    LTMLSleep(str(tmp_path / "m.sqlite"))._sleep(SimpleNamespace(is_global_zero=False), Tiny())
    assert calls == []
