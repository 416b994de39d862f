"""FinalLastCheckpoint: last.ckpt holds the final step even between validations, and resumes exactly."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from memlm.callbacks.checkpointing import FinalLastCheckpoint
from memlm.datamodules.loaders import RandomWindowLoader

IDS = np.arange(5000) % 97


class Recorder(L.LightningModule):
    """A linear model on the token windows that keeps every batch it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(16, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return self.w(batch["input_ids"].float() / 97).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FileAtEachStep(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path, self.exists = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.exists.append(self.path.is_file())


def fit(root: Path, max_steps: int, ckpt_path: str | None = None, **trainer_kw):
    torch.manual_seed(0)
    last = root / "last.ckpt"
    probe = FileAtEachStep(last)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        callbacks=[FinalLastCheckpoint(last), probe], **trainer_kw)
    # 3 batches an epoch: runs cross epoch boundaries, and the epoch seeds the windows
    loader = RandomWindowLoader(IDS, 16, 2, steps=3, seed=1, epoch_fn=lambda: trainer.current_epoch)
    model = Recorder()
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return model, trainer, last, probe


def test_last_ckpt_is_written_once_at_the_final_step(tmp_path):
    model, trainer, last, probe = fit(tmp_path, max_steps=5)
    assert probe.exists == [False, False, False, False, True]  # nothing before the last step
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == trainer.global_step == 5
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v), k


def test_no_step_limit_writes_nothing(tmp_path):
    _, trainer, last, probe = fit(tmp_path, max_steps=-1, max_epochs=1)
    assert trainer.global_step == 3 and not any(probe.exists) and not last.exists()


@pytest.mark.filterwarnings("ignore:.*weights_only.*")
def test_resuming_from_last_ckpt_continues_exactly(tmp_path):
    full, _, _, _ = fit(tmp_path / "full", max_steps=7)
    _, _, last, _ = fit(tmp_path / "part", max_steps=4)  # stops mid-epoch 1
    resumed, trainer, _, _ = fit(tmp_path / "resumed", max_steps=7, ckpt_path=str(last))
    assert trainer.global_step == 7 and len(resumed.seen) == 3
    # the data position came back with the weights: steps 5..7 see the uninterrupted run's batches
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, full.seen[4:]))
    for k, v in full.state_dict().items():
        assert torch.allclose(resumed.state_dict()[k], v, atol=1e-7), k
