"""The evaluation accumulator every MemLM architecture uses, gradient-trained or online.

Validation and test report the same numbers under the same keys for every model
(``val/loss``, ``val/ppl``, ``val/bpb``, ``val/acc`` and ``test/...``), so runs of
different architectures can be compared column by column:

- ``loss``: negative log-likelihood in nats, token-weighted (summed nll over summed
  tokens, so a short last batch counts by its tokens, not as a whole batch);
- ``ppl``: exp(loss), capped at exp(50);
- ``bpb``: summed nll / (ln 2 x UTF-8 bytes of the targets); left out when the byte
  count is unknown (a tokenizer without byte lengths);
- ``acc``: fraction of tokens whose most likely prediction was the target.

The sums are torchmetrics ``SumMetric`` states, which torchmetrics all-reduces across DDP
ranks before ``compute()``. There is one set of sums per evaluation dataloader; the
second and later loaders log with a suffix (``val/loss_<name>``).
"""
from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torchmetrics import SumMetric

LN2 = math.log(2.0)
PPL_LOG_CAP = 50.0  # exp(50) ~ 5e21: beyond that perplexity is just "diverged"


class TokenSums(nn.Module):
    """Token-weighted sums for one evaluation dataloader."""

    def __init__(self) -> None:
        super().__init__()
        self.nll = SumMetric()
        self.tokens = SumMetric()
        self.bytes = SumMetric()
        self.correct = SumMetric()

    def update(self, nll, tokens, nbytes, correct) -> None:
        """Add one batch: summed nll (nats), scored tokens, their UTF-8 bytes, correct predictions."""
        self.nll.update(nll)
        self.tokens.update(tokens)
        self.bytes.update(nbytes)
        self.correct.update(correct)

    def reset(self) -> None:
        for m in (self.nll, self.tokens, self.bytes, self.correct):
            m.reset()

    def compute(self) -> dict[str, torch.Tensor]:
        """{"loss", "ppl", "bpb" (when bytes are known), "acc"}; empty when nothing was scored."""
        tokens = self.tokens.compute()
        if tokens.item() == 0:
            return {}
        nll = self.nll.compute()
        loss = nll / tokens
        out = {"loss": loss, "ppl": torch.exp(loss.clamp(max=PPL_LOG_CAP))}
        nbytes = self.bytes.compute()
        if torch.isfinite(nbytes) and nbytes > 0:
            out["bpb"] = nll / (LN2 * nbytes)
        out["acc"] = self.correct.compute() / tokens
        return out


class EvalAccumulator(nn.Module):
    """One :class:`TokenSums` per evaluation dataloader, logged through the LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        self.loaders = nn.ModuleList()

    def sums(self, dataloader_idx: int = 0, device: torch.device | str | None = None) -> TokenSums:
        while len(self.loaders) <= dataloader_idx:
            self.loaders.append(TokenSums().to(device) if device is not None else TokenSums())
        return self.loaders[dataloader_idx]

    def reset(self) -> None:
        for sums in self.loaders:
            sums.reset()

    def log_to(self, module: L.LightningModule, split: str, names: list[str] | None = None) -> None:
        """Log ``{split}/loss`` etc. for every loader that scored tokens, then reset the sums."""
        for idx, sums in enumerate(self.loaders):
            values = sums.compute()
            if not values:
                continue
            suffix = "" if idx == 0 else f"_{names[idx] if names and idx < len(names) else idx}"
            for name, value in values.items():
                # The sums are already all-reduced by torchmetrics; sync_dist only averages equal values.
                show = name == "loss" and idx == 0 and split == "val"
                module.log(f"{split}/{name}{suffix}", value, prog_bar=show, sync_dist=True)
            sums.reset()
