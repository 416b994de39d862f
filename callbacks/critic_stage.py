"""Stage-4 callback: load a stage-1/2/3 HMST checkpoint and train only its critic.

    trainer:
      callbacks:
        - class_path: memlm.callbacks.critic_stage.CriticStage
          init_args: {init_checkpoint: runs/hmst_micro/version_0/checkpoints/last.ckpt}

with ``data.class_path: memlm.datamodules.critic_data.CriticDataModule``. The best checkpoint
is kept by ``val/critic_loss`` (held-out BCE) instead of the language-model ``val/loss``,
which stage 4 does not compute.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from memlm.callbacks.rl_stage import load_stage_checkpoint
from memlm.core.errors import MemLMError


class CriticStage(L.Callback):
    def __init__(self, init_checkpoint: str | None = None) -> None:
        self.init_checkpoint = init_checkpoint

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from memlm.lightning_modules.hmst.critic_phase import CriticPhase
        from memlm.lightning_modules.hmst.module import HMSTLanguageModel

        if not isinstance(pl_module, HMSTLanguageModel):
            raise MemLMError(f"CriticStage trains the HMST critic; the model is a {type(pl_module).__name__}")
        # the critic's exact-match channel (model.critic_match_ngram) may be new in stage 4: the
        # critic is what this stage trains, so it can start from a checkpoint without it
        load_stage_checkpoint(pl_module, self.init_checkpoint, "stage 4 (critic)", new_ok=("model.critic.match.",))
        tok = pl_module.tokenizer
        pad = tok.pad_id if tok is not None and tok.pad_id is not None else -1
        phase = CriticPhase(pad)
        phase.freeze(pl_module)
        pl_module.critic_phase = phase
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor == "val/loss":
                cb.monitor = "val/critic_loss"  # same mode (min)
