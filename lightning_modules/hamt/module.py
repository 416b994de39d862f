"""LightningModule for HAMT (configs/hamt_*.yaml)."""
from __future__ import annotations

from typing import Any

import torch

from memlm.core.tokenizer import TextTokenizer
from memlm.models.hamt.model import HAMTConfig, HAMTModel
from memlm.lightning_modules.language_model import LanguageModel, ModelOutput
from memlm.core.errors import MemLMError


class HAMTLanguageModel(LanguageModel):
    """Holographic Associative Memory Transformer: constant-size memory, TBPTT across stream chunks.

    The base class carries ``self.carried_state`` (detached) between training steps; the
    :class:`memlm.callbacks.tbptt.TBPTT` callback (added automatically unless the trainer has one)
    resets it at epoch start and on ``batch["first"]``, and stores it in checkpoints.
    """

    stateful = True
    max_seq_len = None

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 2,
        n_embd: int = 128,
        n_slots: int = 8,
        binding: str = "elementwise",
        key_source: str = "content",
        gate_mode: str = "parallel",
        scan_chunk: int = 64,
        conv_kernel: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        tau_min: float = 4.0,
        tau_max: float = 4096.0,
        key_seed: int = 0,
        aux_weight: float = 0.1,
        reset_on_eos: bool = True,
        carry_state: bool = True,
        compile_scan: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(vocab_size, learning_rate, weight_decay, betas, warmup_steps, max_steps, min_lr_ratio)
        self.save_hyperparameters()
        if binding not in ("elementwise", "circular"):
            raise MemLMError(f"model.binding must be 'elementwise' or 'circular', got {binding!r}")
        if key_source not in ("content", "position"):
            raise MemLMError(f"model.key_source must be 'content' or 'position', got {key_source!r}")
        if gate_mode not in ("parallel", "recurrent"):
            raise MemLMError(f"model.gate_mode must be 'parallel' or 'recurrent', got {gate_mode!r}")
        if binding == "circular" and n_embd % 2:
            raise MemLMError(f"circular binding needs an even model.n_embd, got {n_embd}")
        if n_slots < 1 or scan_chunk < 1 or conv_kernel < 1:
            raise MemLMError("model.n_slots, model.scan_chunk and model.conv_kernel must be >= 1")
        self.reset_on_eos = reset_on_eos
        self.carry_state = carry_state
        self.config = HAMTConfig(
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_embd=n_embd,
            n_slots=n_slots,
            binding=binding,
            key_source=key_source,
            gate_mode=gate_mode,
            scan_chunk=scan_chunk,
            conv_kernel=conv_kernel,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            tau_min=tau_min,
            tau_max=tau_max,
            key_seed=key_seed,
            aux_weight=aux_weight,
            compile_scan=compile_scan,
        )
        self.model = HAMTModel(self.config)

    def forward(self, input_ids: torch.Tensor, state: Any = None) -> ModelOutput:
        return self.model(input_ids, state=state)

    def set_tokenizer(self, tokenizer: TextTokenizer) -> None:
        super().set_tokenizer(tokenizer)
        # document boundaries: the memory is cleared when the end-of-text separator is read
        self.config.reset_token_id = tokenizer.eos_id if self.reset_on_eos else None

    def configure_callbacks(self):
        from memlm.callbacks.tbptt import TBPTT

        trainer = self._trainer
        if trainer is not None and any(isinstance(cb, TBPTT) for cb in trainer.callbacks):
            return []
        return [TBPTT(carry=self.carry_state)]

    def flops_per_token(self, seq_len: int) -> float:
        c = self.config
        n = self.model.param_count(non_embedding=True)
        chunk = min(c.scan_chunk, max(1, seq_len))
        # per layer and token: chunked scan (2*S*C*D) + read/unbind/weights (~8*S*D); x3 for fwd+bwd
        mem = c.n_layer * (2 * c.n_slots * chunk * c.n_embd + 8 * c.n_slots * c.n_embd)
        return 6 * n + 3 * mem

    def state_bytes(self, batch_size: int = 1) -> int:
        """Bytes of recurrent state per sequence (constant in the context length)."""
        c = self.config
        return batch_size * c.n_layer * (c.n_slots + c.conv_kernel - 1) * c.n_embd * 4 + 8
