"""LightningModule for the baseline GPT (the plain model is :mod:`memlm.models.transformer`)."""
from __future__ import annotations

import torch

from memlm.core.errors import MemLMError
from memlm.core.outputs import ModelOutput
from memlm.lightning_modules.language_model import LanguageModel
from memlm.models.transformer import GPT, GPTConfig, KVCache


class TransformerLM(LanguageModel):
    """LightningModule for the baseline GPT (configs/transformer_*.yaml)."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        bias: bool = False,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(vocab_size, learning_rate, weight_decay, betas, warmup_steps, max_steps, min_lr_ratio)
        self.save_hyperparameters()
        if n_embd % n_head or (n_embd // n_head) % 2:
            raise MemLMError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head}) with an even head size")
        self.config = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, mlp_ratio, dropout, bias)
        self.model = GPT(self.config)
        self.max_seq_len = block_size

    def forward(self, input_ids: torch.Tensor, state=None) -> ModelOutput:
        return self.model(input_ids, state=state)

    def init_generation_state(self) -> KVCache:
        return KVCache(self.config.n_layer)

    def flops_per_token(self, seq_len: int) -> float:
        c = self.config
        return 6 * self.model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len
