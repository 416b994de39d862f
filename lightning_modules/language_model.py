"""Shared LightningModule for every gradient-trained language model in MemLM.

A subclass builds ``self.model``: a plain ``nn.Module`` whose forward is
``model(input_ids, state=None) -> ModelOutput``. ``state`` is whatever the model carries
between calls (a KV cache for the transformer, a recurrent memory for HAMT/HMST); the
base class uses it both for incremental generation and, for ``stateful`` models, for
truncated BPTT across the contiguous chunks of the stream sampler.

Everything else lives here once: token-weighted cross-entropy, perplexity, bits-per-byte,
accuracy, auxiliary losses, AdamW param groups, warmup + cosine schedule, NaN guard and
sampling-based generation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from memlm.core.errors import MemLMError
from memlm.core.outputs import ModelOutput, detach_state  # noqa: F401 (re-exported for subclasses)
from memlm.core.sampling import sample_next
from memlm.lightning_modules.base import LN2, MemLMModule

IGNORE_INDEX = -100


class _EvalSums(nn.Module):
    """Token-weighted sums for one evaluation dataloader, synced across ranks by torchmetrics."""

    def __init__(self) -> None:
        super().__init__()
        self.nll = SumMetric()
        self.tokens = SumMetric()
        self.bytes = SumMetric()
        self.correct = SumMetric()

    def reset(self) -> None:
        for m in (self.nll, self.tokens, self.bytes, self.correct):
            m.reset()


class LanguageModel(MemLMModule):
    """Base class; subclasses call ``super().__init__(vocab_size=..., ...)`` and build ``self.model``."""

    #: True for models that carry recurrent state across consecutive stream chunks (TBPTT).
    stateful: bool = False
    #: Longest context the model supports (None = unbounded, e.g. recurrent models).
    max_seq_len: int | None = None

    def __init__(
        self,
        vocab_size: int,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.schedule_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        self.model: nn.Module | None = None
        self.carried_state: Any = None  # training state between stream chunks (stateful models)
        self.eval_state: Any = None  # evaluation state between stream chunks
        self._eval_sums = nn.ModuleList()

    # -- forward --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: Any = None) -> ModelOutput:
        return self.model(input_ids, state=state)

    def flops_per_token(self, seq_len: int) -> float | None:
        """Training FLOPs per token (6N + 12·L·H·Q·T); None when unknown."""
        return None

    # -- losses -----------------------------------------------------------------------
    def _token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        )

    def _log_extras(self, out: ModelOutput, prefix_ok: bool = True, **kw) -> torch.Tensor:
        aux_total = torch.zeros((), device=out.logits.device)
        for name, value in out.aux_losses.items():
            aux_total = aux_total + value
            self.log(f"aux/{name}", value.detach().float(), **kw)
        for name, value in out.metrics.items():
            key = name if "/" in name else f"mem/{name}"
            self.log(key, value.detach().float() if torch.is_tensor(value) else float(value), **kw)
        return aux_total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["input_ids"], batch["targets"]
        state = self.carried_state if self.stateful else None
        out = self(x, state=state)
        if self.stateful:
            self.carried_state = detach_state(out.state)
        losses = self._token_losses(out.logits, y)
        n_tokens = (y != IGNORE_INDEX).sum().clamp_min(1)
        loss = losses.sum() / n_tokens
        self._check_finite(loss)
        aux = self._log_extras(out, on_step=True, on_epoch=False)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss + aux

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).item())
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise MemLMError(
                f"loss became non-finite at global step {self.global_step}; training stopped and the last good "
                "checkpoint was kept (lower model.learning_rate, add trainer.gradient_clip_val, or use 32-true precision)"
            )

    # -- evaluation --------------------------------------------------------------------
    def _sums(self, idx: int) -> _EvalSums:
        while len(self._eval_sums) <= idx:
            self._eval_sums.append(_EvalSums().to(self.device))
        return self._eval_sums[idx]

    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        x, y = batch["input_ids"], batch["targets"]
        state = None
        if self.stateful and batch.get("stream", False):
            if batch.get("first", False) or self.eval_state is None:
                self.eval_state = None
            state = self.eval_state
        out = self(x, state=state)
        if self.stateful and batch.get("stream", False):
            self.eval_state = detach_state(out.state)
        losses = self._token_losses(out.logits, y)
        valid = y.reshape(-1) != IGNORE_INDEX
        pred = out.logits.argmax(-1).reshape(-1)
        sums = self._sums(dataloader_idx)
        sums.nll.update(losses.sum())
        sums.tokens.update(valid.sum())
        sums.bytes.update(self.bytes_of(y))
        sums.correct.update(((pred == y.reshape(-1)) & valid).sum())

    def _eval_epoch_end(self, split: str) -> None:
        names = getattr(getattr(self.trainer, "datamodule", None), f"{split}_names", None)
        for idx, sums in enumerate(self._eval_sums):
            tokens = sums.tokens.compute()
            if tokens.item() == 0:
                continue
            nll = sums.nll.compute()
            suffix = "" if idx == 0 else f"_{names[idx] if names and idx < len(names) else idx}"
            loss = nll / tokens
            # The sums are already all-reduced by torchmetrics; sync_dist only averages equal values.
            kw = {"sync_dist": True}
            self.log(f"{split}/loss{suffix}", loss, prog_bar=(idx == 0 and split == "val"), **kw)
            self.log(f"{split}/ppl{suffix}", torch.exp(loss.clamp(max=50)), **kw)
            nbytes = sums.bytes.compute()
            if torch.isfinite(nbytes) and nbytes > 0:
                self.log(f"{split}/bpb{suffix}", nll / (LN2 * nbytes), **kw)
            self.log(f"{split}/acc{suffix}", sums.correct.compute() / tokens, **kw)
            sums.reset()
        self.eval_state = None

    def on_validation_epoch_start(self) -> None:
        self.eval_state = None
        for s in self._eval_sums:
            s.reset()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Greedy continuation of each row of ``input_ids`` (32 new tokens)."""
        x = batch["input_ids"]
        outs = [list(self.generate(row.tolist(), max_new_tokens=32, temperature=0)) for row in x]
        return {"input_ids": x, "generated": outs}

    # -- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        embedding_params = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        for _, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=self.learning_rate, betas=self.betas, fused=fused)
        total = self.schedule_steps
        if total is None:
            try:
                total = int(self.trainer.estimated_stepping_batches)
            except Exception:
                total = 10_000
        total = max(1, min(int(total), 10**9))
        warmup, floor = self.warmup_steps, self.min_lr_ratio

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(1, warmup)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int] | torch.Tensor,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` sampled token ids, one at a time.

        With ``use_cache`` the model's state (KV cache or recurrent memory) is reused, so
        each new token costs one incremental step; without it the whole (cropped) context
        is recomputed every step. Both give identical tokens for the same sampling seed.
        """
        was_training = self.training
        self.eval()
        ids = torch.as_tensor(list(prompt_ids) if not torch.is_tensor(prompt_ids) else prompt_ids, dtype=torch.long)
        ids = ids.reshape(1, -1).to(self.device)
        if ids.numel() == 0:
            eos = eos_id if eos_id is not None else (self.tokenizer.eos_id if self.tokenizer else 0)
            ids = torch.tensor([[eos]], device=self.device)
        eos_id = eos_id if eos_id is not None else (self.tokenizer.eos_id if self.tokenizer else None)
        limit = self.max_seq_len
        try:
            state = self.init_generation_state() if use_cache else None
            context = ids
            if limit is not None and context.size(1) > limit:
                context = context[:, -limit:]
            next_input = context
            for _ in range(max_new_tokens):
                if use_cache:
                    if limit is not None and state is not None and self._cache_len(state) + next_input.size(1) > limit:
                        # cache full: re-prefill the most recent window into a fresh cache
                        state, next_input = self.init_generation_state(), context[:, -limit:]
                    out = self(next_input, state=state)
                    state = out.state
                else:
                    window = context if limit is None else context[:, -limit:]
                    out = self(window, state=None)
                token = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)
                tok = int(token.item())
                yield tok
                if eos_id is not None and tok == eos_id:
                    break
                context = torch.cat([context, token.view(1, 1)], dim=1)
                next_input = token.view(1, 1)
        finally:
            self.train(was_training)

    def init_generation_state(self) -> Any:
        """Empty state for cached generation (a KV cache); None lets forward() create its own."""
        return None

    def _cache_len(self, state: Any) -> int:
        return int(getattr(state, "length", 0))

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        x = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if self.max_seq_len is not None:
            x = x[:, -self.max_seq_len :]
        out = self(x, state=None)
        if out.hidden is None:
            raise MemLMError(f"{type(self).__name__} does not expose hidden states for embeddings")
        return F.normalize(out.hidden[0].float().mean(0), dim=-1)
