"""Stage 4 of HMST: the critic learns to tell supported, correct answers from corrupted ones.

:class:`CriticPhase` is installed by :class:`memlm.callbacks.critic_stage.CriticStage`. Every
parameter except the critic's is frozen; batches are the encoded triples of
:class:`memlm.datamodules.critic_data.CriticDataModule`. Validation runs on triples of held-out
entities and logs ``val/critic_loss`` (BCE), ``val/critic_acc``, ``val/critic_auroc`` and
``val/critic_ece`` (torchmetrics, 15 equal-width bins).
"""
from __future__ import annotations

import torch
from torchmetrics.classification import BinaryAUROC, BinaryCalibrationError

BATCH_KEYS = ("query_ids", "response_ids", "fact_ids", "labels")


def check_batch(batch) -> None:
    from memlm.core.errors import MemLMError

    if not isinstance(batch, dict) or any(k not in batch for k in BATCH_KEYS):
        raise MemLMError("stage 4 trains the critic on (query, response, facts) triples: use "
                         "data.class_path memlm.datamodules.critic_data.CriticDataModule")


class CriticPhase:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.auroc = BinaryAUROC()
        self.ece = BinaryCalibrationError(n_bins=15, norm="l1")
        self.loss_sum, self.correct, self.count = 0.0, 0.0, 0

    def freeze(self, module) -> None:
        for name, p in module.named_parameters():
            p.requires_grad_(name.startswith("model.critic."))

    def _score(self, module, batch):
        check_batch(batch)
        crit = module.model.critic
        out = crit(batch["query_ids"], batch["response_ids"], batch["fact_ids"], pad_id=self.pad_id)
        return out, crit.loss(out, batch["labels"])

    def training_step(self, module, batch, batch_idx):
        out, loss = self._score(module, batch)
        acc = ((out.p_correct > 0.5).float() == batch["labels"]).float().mean()
        module.log("train/critic_loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        module.log("train/critic_acc", acc, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, module, batch, batch_idx):
        out, loss = self._score(module, batch)
        y = batch["labels"]
        n = y.numel()
        self.loss_sum += float(loss) * n
        self.correct += float(((out.p_correct > 0.5).float() == y).sum())
        self.count += n
        self.auroc.update(out.p_correct.cpu(), y.long().cpu())
        self.ece.update(out.p_correct.cpu(), y.long().cpu())

    def compute(self) -> dict:
        if self.count == 0:
            return {}
        res = {"critic_loss": self.loss_sum / self.count, "critic_acc": self.correct / self.count,
               "critic_auroc": float(self.auroc.compute()), "critic_ece": float(self.ece.compute())}
        self.auroc.reset()
        self.ece.reset()
        self.loss_sum, self.correct, self.count = 0.0, 0.0, 0
        return res

    def on_validation_epoch_end(self, module) -> None:
        for k, v in self.compute().items():
            module.log(f"val/{k}", v, prog_bar=k == "critic_auroc")
