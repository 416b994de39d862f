"""What every MemLM LightningModule shares, gradient-trained or not.

- the tokenizer travels inside the checkpoint (as JSON), so chat/serve never need the data;
- ``checkpoint["memlm"]`` records the class path, so :func:`memlm.checkpoint.load_module`
  can rebuild any architecture from a bare ``.ckpt`` file;
- bits-per-byte uses the tokenizer's exact UTF-8 byte count per token;
- the chat protocol: ``generate(prompt_ids, ...)`` yields token ids one at a time.
"""
from __future__ import annotations

import math
from typing import Iterator

import lightning as L
import torch

from memlm.core.errors import MemLMError
from memlm.core.sampling import sample_next  # noqa: F401 (re-exported)
from memlm.core.tokenizer import TextTokenizer

CHECKPOINT_FORMAT = 1
LN2 = math.log(2.0)


class MemLMModule(L.LightningModule):
    """Base for all MemLM modules. Subclasses set ``self.tokenizer`` or receive it in setup()."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer: TextTokenizer | None = None
        self.register_buffer("token_bytes", torch.zeros(0, dtype=torch.long), persistent=False)

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
        if self.tokenizer is not None and self.tokenizer.fingerprint() != tok.fingerprint():
            raise MemLMError(
                "the datamodule's tokenizer differs from the checkpoint's tokenizer "
                f"({tok.fingerprint()} vs {self.tokenizer.fingerprint()}); point --data.tokenizer at the "
                "checkpoint's tokenizer (python -m memlm.checkpoint export-tokenizer CKPT OUT.json)"
            )
        self.set_tokenizer(tok)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never overwrite the last good checkpoint with non-finite weights (e.g. an overflow
        # in the backward pass that the loss check did not see); raising here aborts the write.
        bad = [n for n, p in self.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if bad:
            raise MemLMError(
                f"model weights became non-finite ({bad[0]}) at global step {self.global_step}; training stopped "
                "and the last good checkpoint was kept (lower model.learning_rate or add trainer.gradient_clip_val)"
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
            if self.tokenizer is not None and self.tokenizer.fingerprint() != tok.fingerprint():
                raise MemLMError(
                    "the datamodule's tokenizer differs from the checkpoint's tokenizer "
                    f"({self.tokenizer.fingerprint()} vs {tok.fingerprint()}); point --data.tokenizer at the "
                    "checkpoint's tokenizer (python -m memlm.checkpoint export-tokenizer CKPT OUT.json)"
                )
            self.set_tokenizer(tok)

    # -- bits per byte ----------------------------------------------------------------
    def bytes_of(self, targets: torch.Tensor) -> torch.Tensor:
        """Total UTF-8 bytes represented by ``targets`` (ignored positions = -100 count 0)."""
        if self.token_bytes.numel() == 0:
            return torch.tensor(float("nan"), device=targets.device)
        valid = targets >= 0
        return self.token_bytes.to(targets.device)[targets.clamp_min(0)].mul(valid).sum()

    # -- chat protocol ----------------------------------------------------------------
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
        raise MemLMError(f"{type(self).__name__} cannot generate text")

    def embed(self, ids: list[int]) -> torch.Tensor:
        """A fixed-size vector for a token sequence (used by /v1/embeddings and LTML)."""
        raise MemLMError(f"{type(self).__name__} has no embedding")
