"""What every MemLM LightningModule shares, gradient-trained or not.

- the tokenizer travels inside the checkpoint (as JSON), so chat/serve never need the data;
- ``checkpoint["memlm"]`` records the class path, so :func:`memlm.checkpoint.load_module`
  can rebuild any architecture from a bare ``.ckpt`` file;
- bits-per-byte uses the tokenizer's exact UTF-8 byte count per token;
- evaluation: one :class:`~memlm.lightning_modules.evaluation.EvalAccumulator` (``self.evaluation``)
  that every architecture feeds, so val/ and test/ loss, ppl, bpb and acc have the same keys;
- hyperparameters are stored plain (dataclass groups as dicts) for ``torch.load(weights_only=True)``;
- online learners (no optimizer) count their updates as Lightning steps (:meth:`count_online_step`);
- the chat protocol: ``generate(prompt_ids, SamplingParams(...))`` yields token ids one at a time.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Iterator

import lightning as L
import torch

from memlm.core.errors import MemLMError
from memlm.core.sampling import SamplingParams, sample_next  # noqa: F401 (re-exported)
from memlm.core.tokenizer import TextTokenizer
from memlm.lightning_modules.evaluation import LN2, EvalAccumulator, TokenSums  # noqa: F401 (LN2 re-exported)

CHECKPOINT_FORMAT = 1


def plain_hparam(value: Any) -> Any:
    """A hyperparameter as checkpoint-safe primitives: dataclass -> dict, tuple -> list."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain_hparam(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain_hparam(v) for v in value]
    return value


def _require_same_tokenizer(data: TextTokenizer, checkpoint: TextTokenizer) -> None:
    """Raise MemLMError unless the datamodule's tokenizer is the checkpoint's (token ids would not match)."""
    if data.fingerprint() != checkpoint.fingerprint():
        raise MemLMError(
            "the datamodule's tokenizer differs from the checkpoint's tokenizer "
            f"({data.fingerprint()} vs {checkpoint.fingerprint()}); point --data.tokenizer at the "
            "checkpoint's tokenizer (python -m memlm.checkpoint export-tokenizer CKPT OUT.json)"
        )


class MemLMModule(L.LightningModule):
    """Base for all MemLM modules. Subclasses set ``self.tokenizer`` or receive it in setup()."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer: TextTokenizer | None = None
        self.register_buffer("token_bytes", torch.zeros(0, dtype=torch.long), persistent=False)
        self.evaluation = EvalAccumulator()

    def save_hyperparameters(self, *args, ignore=None, frame=None, logger: bool = True) -> None:
        """As Lightning's, with dataclass groups (``optimizer``) stored as plain dicts: the
        checkpoint's ``hyper_parameters`` must load with ``torch.load(weights_only=True)``."""
        if frame is None:  # Lightning reads the caller's frame; from here that is the subclass __init__
            frame = inspect.currentframe().f_back
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        for hparams in (self._hparams, self._hparams_initial):
            for key, value in list(hparams.items()):
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    hparams[key] = plain_hparam(value)

    @classmethod
    def upgrade_hparams(cls, hparams: dict) -> dict:
        """A checkpoint's stored hyperparameters in this class's current form (the identity here;
        :func:`memlm.checkpoint.load_module` calls it so older checkpoints keep loading)."""
        return hparams

    # -- tokenizer --------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: TextTokenizer) -> None:
        expected = getattr(self, "vocab_size", None) or getattr(self.hparams, "vocab_size", None)
        if expected is not None and tokenizer.vocab_size > int(expected):
            raise MemLMError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model was built for {expected}; "
                "use the tokenizer stored in the checkpoint or retrain with a matching data.vocab_size"
            )
        self.tokenizer = tokenizer
        tb = torch.tensor(tokenizer.token_bytes(), dtype=torch.long)
        if expected is not None and len(tb) < int(expected):
            tb = torch.cat([tb, torch.zeros(int(expected) - len(tb), dtype=torch.long)])
        self.token_bytes = tb.to(self.token_bytes.device)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is None:
            return
        if self.tokenizer is not None:
            _require_same_tokenizer(data=tok, checkpoint=self.tokenizer)
        self.set_tokenizer(tok)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never overwrite the last good checkpoint with non-finite weights (e.g. an overflow
        # in the backward pass that the loss check did not see); raising here aborts the write.
        bad = [n for n, p in self.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if bad:
            raise MemLMError(
                f"model weights became non-finite ({bad[0]}) at global step {self.global_step}; training stopped "
                "and the last good checkpoint was kept (lower model.optimizer.learning_rate or add trainer.gradient_clip_val)"
            )
        cls = type(self)
        checkpoint["memlm"] = {
            "format": CHECKPOINT_FORMAT,
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "tokenizer": self.tokenizer.to_json() if self.tokenizer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("memlm") or {}
        if meta.get("tokenizer"):
            tok = TextTokenizer.from_json(meta["tokenizer"])
            # fit/validate --ckpt_path: setup() already took the datamodule's tokenizer; the
            # data must have been tokenized by the checkpoint's tokenizer.
            if self.tokenizer is not None:
                _require_same_tokenizer(data=self.tokenizer, checkpoint=tok)
            self.set_tokenizer(tok)

    # -- bits per byte ----------------------------------------------------------------
    def bytes_of(self, targets: torch.Tensor) -> torch.Tensor:
        """Total UTF-8 bytes represented by ``targets`` (ignored positions = -100 count 0)."""
        if self.token_bytes.numel() == 0:
            return torch.tensor(float("nan"), device=targets.device)
        valid = targets >= 0
        return self.token_bytes.to(targets.device)[targets.clamp_min(0)].mul(valid).sum()

    # -- evaluation: one accumulator, the same keys for every architecture ----------------
    def eval_sums(self, dataloader_idx: int = 0) -> TokenSums:
        """The sums a validation/test step adds its batch to (see :mod:`memlm.lightning_modules.evaluation`)."""
        return self.evaluation.sums(dataloader_idx, self.device)

    def on_validation_epoch_start(self) -> None:
        self.evaluation.reset()

    def on_test_epoch_start(self) -> None:
        self.evaluation.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, split: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.evaluation.log_to(self, split, getattr(dm, f"{split}_names", None))

    # -- step logging ---------------------------------------------------------------------
    def step_logs_due(self) -> bool:
        """Whether values logged in this training step reach the loggers.

        Lightning writes step metrics every ``trainer.log_every_n_steps`` batches and drops
        the rest, yet each ``self.log`` call still costs its bookkeeping (and a value that must
        be computed, a host sync). Hot paths log only when this is True: at Lightning's own
        logging steps and at the last step (so a short run still leaves its final values in
        ``trainer.callback_metrics``). Outside a fit it is always True.
        """
        trainer = self._trainer
        if trainer is None or not trainer.training:
            return True
        if trainer._logger_connector.should_update_logs:
            return True
        return trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step + 1

    # -- online learners -------------------------------------------------------------------
    def count_online_step(self) -> None:
        """Count one learning update of a module without an optimizer as a training step.

        In manual optimization Lightning's ``global_step`` counts optimizer steps, so a
        learner that never calls ``optimizer.step()`` would stay at step 0: ``max_steps``
        would never stop training, and ``val_check_interval``, step checkpoints and the
        logged step axis would not advance. Call once per training_step."""
        if self._trainer is None:
            return
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    # -- chat protocol ----------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int] | torch.Tensor,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield up to ``params.max_new_tokens`` token ids continuing ``prompt_ids``, one at a time.

        ``params`` None means ``SamplingParams()``. ``generator`` (if given) drives the sampling
        instead of one seeded from ``params.seed``. Every subclass overrides this signature as is.
        """
        raise MemLMError(f"{type(self).__name__} cannot generate text")

    def embed(self, ids: list[int]) -> torch.Tensor:
        """A fixed-size vector for a token sequence (used by /v1/embeddings and LTML)."""
        raise MemLMError(f"{type(self).__name__} has no embedding")
