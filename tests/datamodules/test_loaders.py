"""Resumable loaders inside Lightning: the checkpoint holds the data position, a resumed fit continues it."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from memlm.datamodules.loaders import StreamLoader

IDS = np.arange(2000)
B, T = 2, 8  # 2 streams of 1000 tokens: 124 chunks, cut to 5 an epoch below


class Chunks(L.LightningModule):
    """Keeps (epoch, chunk, first, input_ids) of every batch it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(T, 1)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["chunk"], batch["first"], batch["input_ids"].clone()))
        return self.w(batch["input_ids"].float() / 2000).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveAt(L.Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def fit(root: Path, max_steps: int, callbacks=(), ckpt_path=None) -> Chunks:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        callbacks=list(callbacks))
    model = Chunks()
    loader = StreamLoader(IDS, T, B, max_chunks=5, epoch_fn=lambda: trainer.current_epoch)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return model


@pytest.mark.filterwarnings("ignore:.*weights_only.*")
@pytest.mark.parametrize("at", [3, 5, 7])  # mid-epoch 0, at the epoch's end, mid-epoch 1
def test_checkpoint_holds_the_loader_position_and_resume_continues_the_streams(tmp_path, at):
    full = fit(tmp_path / "full", max_steps=10)
    assert [s[1] for s in full.seen] == [0, 1, 2, 3, 4] * 2 and [s[2] for s in full.seen] == [True, False, False, False, False] * 2
    ckpt = tmp_path / "mid.ckpt"
    fit(tmp_path / "part", max_steps=at, callbacks=[SaveAt(at, ckpt)])
    state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"epoch": (at - 1) // 5, "consumed": (at - 1) % 5 + 1}]  # batches the loader has handed out
    resumed = fit(tmp_path / "resumed", max_steps=10, ckpt_path=str(ckpt))
    # exactly the batches the uninterrupted run saw after step `at`: same chunks, same tokens, same epochs
    assert [s[:3] for s in resumed.seen] == [s[:3] for s in full.seen[at:]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(resumed.seen, full.seen[at:]))
