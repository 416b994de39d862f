"""Lightning callback: run LTML sleep (consolidation) during or after training.

    trainer:
      callbacks:
        - class_path: memlm.callbacks.ltml_sleep.LTMLSleep
          init_args: {db: ltml.sqlite, every_n_train_steps: 500, embedder: auto}

Use it when a training or fine-tuning run also produces or reads chat logs (e.g. a
conversation-stream datamodule that logs into LTML, or a deployment that keeps logging
while a new model trains): the memory is consolidated at the chosen steps, at the end of
every validation, and when training ends. ``embedder: module`` embeds with the model
being trained (its mean-pooled hidden states). Runs on global rank zero only; the
consolidation statistics are logged as ``ltml/<name>``.
"""
from __future__ import annotations

import lightning as L

from memlm.memory.ltml.embeddings import get_embedder
from memlm.memory.ltml.sleep import SleepConfig, sleep
from memlm.memory.ltml.store import Store


class LTMLSleep(L.Callback):
    def __init__(self, db: str, every_n_train_steps: int | None = None, on_validation_end: bool = False,
                 on_train_end: bool = True, embedder: str = "auto", forget_threshold: float = 0.08) -> None:
        super().__init__()
        self.db = db
        self.every_n_train_steps = every_n_train_steps
        self.at_validation_end = on_validation_end
        self.at_train_end = on_train_end
        self.embedder_spec = embedder
        self.config = SleepConfig(forget_threshold=forget_threshold, use_llm=False)
        self._embedder = None
        self.last_stats: dict | None = None

    def _sleep(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if not trainer.is_global_zero:
            return
        if self._embedder is None:
            self._embedder = get_embedder(self.embedder_spec, module=pl_module if self.embedder_spec == "module" else None)
        store = Store(self.db)
        try:
            was_training = pl_module.training
            self.last_stats = sleep(store, self._embedder, config=self.config)
            pl_module.train(was_training)
        finally:
            store.close()
        if trainer.logger is not None:
            figures = {f"ltml/{k}": float(v) for k, v in self.last_stats.items()
                       if k in ("interactions", "added", "merged", "superseded", "archived")}
            trainer.logger.log_metrics(figures, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._sleep(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.at_validation_end and not trainer.sanity_checking:
            self._sleep(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self._sleep(trainer, pl_module)
