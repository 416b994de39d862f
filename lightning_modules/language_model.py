"""Shared LightningModule for every gradient-trained language model in MemLM.

A subclass builds ``self.model``: a plain ``nn.Module`` whose forward is
``model(input_ids, state=None) -> ModelOutput``. ``state`` is whatever the model carries
between calls (a KV cache for the transformer, a recurrent memory for HAMT/HMST); the
base class uses it both for incremental generation and, for ``stateful`` models, for
truncated BPTT across the contiguous chunks of the stream sampler.

Everything else lives here once: token-weighted cross-entropy (evaluated through the
shared :mod:`memlm.lightning_modules.evaluation` accumulator: perplexity, bits-per-byte,
accuracy), auxiliary losses, the optimizer settings (:class:`OptimizerConfig`, one
``optimizer`` group: ``model.init_args.optimizer.learning_rate`` ...), AdamW param groups,
warmup + cosine schedule, NaN guard and sampling-based generation.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
import inspect
from dataclasses import dataclass, fields, replace
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from memlm.core.checks import require_positive
from memlm.core.errors import MemLMError
from memlm.core.outputs import ModelOutput, detach_state  # noqa: F401 (re-exported for subclasses)
from memlm.core.sampling import SamplingParams, resolve_params, sample_next
from memlm.lightning_modules.base import MemLMModule, plain_hparam

IGNORE_INDEX = -100


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + linear warmup + cosine decay: the ``optimizer`` group of every gradient-trained module.

    ``max_steps`` is the schedule's horizon (None: the trainer's estimated stepping batches);
    the learning rate decays to ``min_lr_ratio * learning_rate``. Frozen, so one default
    instance can sit in every signature. Checkpoints store it as a plain dict
    (:meth:`MemLMModule.save_hyperparameters`).
    """

    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    max_steps: int | None = None
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # YAML and checkpoints give lists

    @classmethod
    def coerce(cls, value: "OptimizerConfig | Mapping | None", base: "OptimizerConfig | None" = None) -> "OptimizerConfig":
        """An OptimizerConfig from itself, a dict (a checkpoint's hyperparameters; missing keys
        taken from ``base``) or None (``base``, default ``OptimizerConfig()``)."""
        base = cls() if base is None else base
        if value is None:
            return base
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise MemLMError(f"unknown model.optimizer settings {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
            return replace(base, **value)
        raise MemLMError(f"model.optimizer must be a mapping of {[f.name for f in fields(cls)]}, got {type(value).__name__}")


def fold_legacy_optimizer_hparams(hparams: dict) -> dict:
    """Hyperparameters of a checkpoint written before the ``optimizer`` group: the flat
    ``learning_rate``/``weight_decay``/... keys move into ``hparams["optimizer"]``."""
    names = [f.name for f in fields(OptimizerConfig)]
    flat = {k: hparams[k] for k in names if k in hparams}
    if not flat:
        return hparams
    out = {k: v for k, v in hparams.items() if k not in flat}
    out["optimizer"] = {**flat, **dict(out.get("optimizer") or {})}
    return out


class LanguageModel(MemLMModule):
    """Base class; subclasses call ``super().__init__(vocab_size=..., ...)`` and build ``self.model``."""

    #: True for models that carry recurrent state across consecutive stream chunks (TBPTT); they
    #: implement :class:`memlm.core.state.RecurrentState`, through which the TBPTT callback and the
    #: checkpoint handle ``carried_state``.
    stateful: bool = False
    #: Longest context the model supports (None = unbounded, e.g. recurrent models).
    max_seq_len: int | None = None

    def __init__(
        self,
        vocab_size: int,
        optimizer: OptimizerConfig | Mapping | None = None,
    ) -> None:
        super().__init__()
        require_positive("model", vocab_size=vocab_size)
        self.vocab_size = int(vocab_size)
        # a dict (from a checkpoint) fills its gaps from this class's own default group (HAMT's learning rate differs)
        declared = inspect.signature(type(self).__init__).parameters.get("optimizer")
        base = declared.default if declared is not None and isinstance(declared.default, OptimizerConfig) else None
        self.optimizer_config = OptimizerConfig.coerce(optimizer, base)
        self.model: nn.Module | None = None
        self.carried_state: Any = None  # training state between stream chunks (stateful models)
        self.eval_state: Any = None  # evaluation state between stream chunks
        self._first_nonfinite_step: torch.Tensor | None = None  # see _check_finite
        # fraction of the training budget spent, when a callback trains for a wall-clock budget
        # (memlm.callbacks.budget.WallClockBudget); None: the cosine decay follows the step count
        self.schedule_progress: float | None = None

    def save_hyperparameters(self, *args, ignore=None, frame=None, logger: bool = True) -> None:
        """As the base; the ``optimizer`` group is stored resolved (every field), whether it was
        given as an OptimizerConfig, a partial dict or not at all."""
        super().save_hyperparameters(*args, ignore=ignore, frame=frame or inspect.currentframe().f_back, logger=logger)
        for hparams in (self._hparams, self._hparams_initial):
            if "optimizer" in hparams:
                hparams["optimizer"] = plain_hparam(self.optimizer_config)

    @classmethod
    def upgrade_hparams(cls, hparams: dict) -> dict:
        return fold_legacy_optimizer_hparams(hparams)

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

    def _log_extras(self, out: ModelOutput, aux: dict[str, torch.Tensor] | None = None, **kw) -> torch.Tensor:
        """Log ``aux/<name>`` for each auxiliary loss and ``mem/<name>`` for each model metric;
        returns the summed auxiliary loss. ``aux`` (default ``out.aux_losses``) lets a module
        pass its weighted or extra losses (HMST's exit and critic terms)."""
        aux = out.aux_losses if aux is None else aux
        aux_total = sum(aux.values(), torch.zeros((), device=out.logits.device))
        if kw.get("on_step") and not kw.get("on_epoch") and not self.step_logs_due():
            return aux_total  # a training step whose logged values no logger would receive
        for name, value in aux.items():
            self.log(f"aux/{name}", value.detach().float(), **kw)
        for name, value in out.metrics.items():
            key = name if "/" in name else f"mem/{name}"
            self.log(key, value.detach().float() if torch.is_tensor(value) else float(value), **kw)
        return aux_total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["input_ids"], batch["targets"]
        state = self.carried_state if self.stateful else None
        out = self(x, state=state)
        if self.stateful:  # stateful modules implement memlm.core.state.RecurrentState
            self.carried_state = self.detach_state(out.state)
        losses = self._token_losses(out.logits, y)
        n_tokens = (y != IGNORE_INDEX).sum().clamp_min(1)
        loss = losses.sum() / n_tokens
        self._check_finite(loss)
        aux = self._log_extras(out, on_step=True, on_epoch=False)
        if self.step_logs_due():
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss + aux

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop training on a non-finite loss, without a host sync every step.

        Each step notes on the device the first global step whose loss was not finite. The note
        is read (one sync) at logging steps, before every checkpoint write and at the end of
        training, so no checkpoint ever holds the weights that followed a bad step; outside a
        fit it is read at once."""
        bad = ~torch.isfinite(loss.detach())
        first = self._first_nonfinite_step
        if first is None or first.device != bad.device:
            first = torch.full((), -1, dtype=torch.long, device=bad.device)
        self._first_nonfinite_step = torch.where(bad & (first < 0), self.global_step, first)
        if self.step_logs_due():
            self.raise_if_loss_was_nonfinite()

    def raise_if_loss_was_nonfinite(self) -> None:
        """MemLMError if any training step so far had a non-finite loss (on any rank)."""
        first = self._first_nonfinite_step
        step = int(first.item()) if first is not None else -1
        bad = step >= 0
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise MemLMError(
                f"loss became non-finite at global step {step if step >= 0 else self.global_step}; training stopped "
                "and the last good checkpoint was kept (lower model.optimizer.learning_rate, add "
                "trainer.gradient_clip_val, or use 32-true precision)"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_loss_was_nonfinite()  # raising here aborts the write: the last good file stays
        super().on_save_checkpoint(checkpoint)

    def on_train_end(self) -> None:
        self.raise_if_loss_was_nonfinite()

    # -- evaluation --------------------------------------------------------------------
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
        correct = ((pred == y.reshape(-1)) & valid).sum()
        self.eval_sums(dataloader_idx).update(losses.sum(), valid.sum(), self.bytes_of(y), correct)
        self._eval_output(batch, out)

    def _eval_output(self, batch: dict, out: ModelOutput) -> None:
        """Extra per-batch evaluation of a subclass (HMST: exact match, ingestion); none here."""

    def _eval_epoch_end(self, split: str) -> None:
        self._log_evaluation(split)
        self.eval_state = None

    def on_validation_epoch_start(self) -> None:
        self.eval_state = None
        self.evaluation.reset()

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
        greedy = SamplingParams(max_new_tokens=32, temperature=0)
        outs = [list(self.generate(row.tolist(), greedy)) for row in x]
        return {"input_ids": x, "generated": outs}

    # -- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        embedding_params = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        for _, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
        cfg = self.optimizer_config
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, fused=fused)
        total = cfg.max_steps
        if total is None:
            try:
                total = int(self.trainer.estimated_stepping_batches)
            except Exception:
                total = 10_000
        total = max(1, min(int(total), 10**9))
        warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(1, warmup)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if self.schedule_progress is not None:  # a wall-clock budget sets how far the decay has got
                progress = min(1.0, max(0.0, self.schedule_progress))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's FSDP precision plugin refuses norm clipping; the FSDP root computes the norm over
        # every rank's shard itself, so `gradient_clip_val` keeps working for the sharded presets.
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = getattr(self.trainer.strategy, "model", None)
        if gradient_clip_val and isinstance(wrapped, FullyShardedDataParallel) and gradient_clip_algorithm in (None, "norm"):
            wrapped.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- generation ----------------------------------------------------------------------
    # the one generate(prompt_ids, params, generator) signature that MemLMModule defines and every module overrides
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int] | torch.Tensor,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield up to ``params.max_new_tokens`` sampled token ids, one at a time.

        With ``params.use_cache`` the model's state (KV cache or recurrent memory) is reused, so
        each new token costs one incremental step; without it the whole (cropped) context
        is recomputed every step. Both give identical tokens for the same sampling seed.
        """
        params = resolve_params(params)
        eos_id, use_cache = params.eos_id, params.use_cache
        if generator is None:
            generator = params.make_generator(self.device)
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
            for _ in range(params.max_new_tokens):
                if use_cache:
                    if limit is not None and state is not None and self._cache_len(state) + next_input.size(1) > limit:
                        # cache full: re-prefill the most recent window into a fresh cache
                        state, next_input = self.init_generation_state(), context[:, -limit:]
                    out = self(next_input, state=state)
                    state = out.state
                else:
                    window = context if limit is None else context[:, -limit:]
                    out = self(window, state=None)
                token = sample_next(out.logits[:, -1], params, generator)
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
