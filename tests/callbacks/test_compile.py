"""CompileModel: compiled training gives the eager losses, and checkpoints keep eager key names."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from memlm.callbacks.compile import CompileModel
from memlm.core.errors import MemLMError
from memlm.lightning_modules.language_model import OptimizerConfig
from memlm.lightning_modules.transformer import TransformerLM

T = 16


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def batches():
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 64, (4, 2, T + 1), generator=g)
    return [{"input_ids": d[:, :T], "targets": d[:, 1:]} for d in data]


def fit(tmp_path, compiled: bool):
    torch.manual_seed(0)
    module = TransformerLM(64, block_size=T, n_layer=1, n_head=2, n_embd=32,
                           optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1))
    losses = Losses()
    callbacks = [losses] + ([CompileModel()] if compiled else [])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(batches(), batch_size=None))
    return module, losses.values, trainer


@pytest.mark.slow  # inductor compiles forward and backward (~20-60 s on a loaded 2-core machine)
@pytest.mark.timeout(300)
def test_compiled_training_matches_eager_and_keeps_checkpoint_keys(tmp_path):
    torch.set_num_threads(1)
    eager, eager_losses, _ = fit(tmp_path / "eager", compiled=False)
    comp, comp_losses, trainer = fit(tmp_path / "compiled", compiled=True)
    assert comp.model._compiled_call_impl is not None  # it really ran compiled
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    assert eager_losses[-1] != eager_losses[0]  # the steps trained (the comparison covers updates)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    keys = torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"].keys()
    assert keys == eager.state_dict().keys() and not any("_orig_mod" in k for k in keys)


def test_compile_refuses_a_module_without_a_network():
    class NoNet(L.LightningModule):
        pass

    with pytest.raises(MemLMError, match="no .model network"):
        CompileModel().setup(None, NoNet(), "fit")
