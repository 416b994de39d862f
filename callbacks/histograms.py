"""Distributions as dashboard histograms, and HMST's gate statistics among them.

``log_histograms`` hands ``{key: values}`` to every logger that draws histograms: W&B (online or
offline, as ``wandb.Histogram`` rows stepped by ``trainer/global_step`` like Lightning's own
metrics) and TensorBoard (``add_histogram``). CSV has no histograms and is skipped. Only rank 0
logs, and a failing logger warns instead of stopping training.

``GateHistograms`` logs HMST's meta-controller every ``every_n_steps`` training steps: per gate
(exit, episodic, semantic, verify, expert_bias) the distribution over the batch rows of the
controller's P(on), and the distribution of the chosen expert bias (``n_experts`` = none). The
module keeps its last training decision in ``last_gate_decision``; nothing is computed for it.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger
import numpy as np
import torch


def log_histograms(trainer, values: dict[str, np.ndarray | torch.Tensor], step: int) -> None:
    if trainer.global_rank != 0 or not values:
        return
    arrays = {k: (v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32))
              for k, v in values.items()}
    for logger in trainer.loggers:
        try:
            experiment = getattr(logger, "experiment", None)
            if isinstance(logger, WandbLogger):
                import wandb

                rows = {k: wandb.Histogram(a.ravel()) for k, a in arrays.items()}
                experiment.log({**rows, "trainer/global_step": step})
            elif hasattr(experiment, "add_histogram"):  # TensorBoard
                for k, a in arrays.items():
                    experiment.add_histogram(k, a.ravel(), step)
        except Exception as exc:  # a dashboard must not stop training
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"could not log histograms to {type(logger).__name__}: {exc}")


class GateHistograms(L.Callback):
    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, int(every_n_steps))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        decision = getattr(pl_module, "last_gate_decision", None)
        step = int(trainer.global_step)
        if decision is None or (step - 1) % self.every_n_steps:  # global_step already counts this batch
            return
        values = {f"gates/p_{name}": p for name, p in decision.probs.items() if name != "expert"}
        if "expert" in decision.probs:  # P(some expert is biased) = 1 - P(the "no bias" choice)
            values["gates/p_expert_bias"] = 1.0 - decision.probs["expert"][:, -1]
        values["gates/expert_choice"] = decision.expert_choice
        log_histograms(trainer, values, step)
