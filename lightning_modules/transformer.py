"""LightningModule for the baseline GPT (the plain model is :mod:`memlm.models.transformer`)."""
from __future__ import annotations

import torch

from memlm.core.checks import require_divisible, require_positive
from memlm.core.outputs import ModelOutput
from memlm.lightning_modules.language_model import LanguageModel, OptimizerConfig
from memlm.models.transformer import GPT, GPTConfig, KVCache


class TransformerLM(LanguageModel):
    """LightningModule for the baseline GPT (configs/transformer_*.yaml)."""

    # jsonargparse builds the config schema from this signature, so it repeats GPTConfig's fields
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
        rope_base: float = 10000.0,
        # Repeated in each subclass (not **kwargs): LightningCLI and save_hyperparameters read
        # the concrete class's own signature.
        optimizer: OptimizerConfig = OptimizerConfig(),
    ) -> None:
        super().__init__(vocab_size, optimizer)
        self.save_hyperparameters()
        require_positive("model", block_size=block_size, n_layer=n_layer)
        require_divisible("model", "n_embd", n_embd, "n_head", n_head, even_head=True)
        self.config = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, mlp_ratio, dropout, bias, rope_base)
        self.model = GPT(self.config)
        self.max_seq_len = block_size

    def forward(self, input_ids: torch.Tensor, state=None) -> ModelOutput:
        return self.model(input_ids, state=state)

    def init_generation_state(self) -> KVCache:
        return KVCache(self.config.n_layer)

    def flops_per_token(self, seq_len: int) -> float:
        c = self.config
        return 6 * self.model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len
