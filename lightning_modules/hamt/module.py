"""LightningModule for HAMT (configs/hamt_*.yaml)."""
from __future__ import annotations

from typing import Any

import torch

from memlm.core.tokenizer import TextTokenizer
from memlm.models.hamt.model import HAMTConfig, HAMTModel
from memlm.lightning_modules.language_model import LanguageModel, ModelOutput, OptimizerConfig
from memlm.core.checks import require_positive
from memlm.core.errors import MemLMError
from memlm.core.state import (
    detach_tensors, flatten_tensors, leading_batch_size, reset_tensor_rows, row_mask, unflatten_tensors,
)


class HAMTLanguageModel(LanguageModel):
    """Holographic Associative Memory Transformer: constant-size memory, TBPTT across stream chunks.

    The base class carries ``self.carried_state`` (detached) between training steps; the
    :class:`memlm.callbacks.tbptt.TBPTT` callback (added automatically unless the trainer has one)
    resets it at epoch start and on ``batch["first"]``, and stores it in checkpoints.
    """

    stateful = True
    max_seq_len = None

    # jsonargparse builds the config schema from this signature, so it repeats HAMTConfig's fields
    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 2,
        n_embd: int = 128,
        n_slots: int = 8,
        binding: str = "elementwise",
        key_source: str = "content",
        gate_mode: str = "parallel",
        scan_chunk: int = 8,
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
        mem_expand: int = 1,
        scan_impl: str = "fused",
        # Repeated in each subclass (not **kwargs): LightningCLI and save_hyperparameters read
        # the concrete class's own signature.
        optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3),
    ) -> None:
        super().__init__(vocab_size, optimizer)
        self.save_hyperparameters()
        if binding not in ("elementwise", "circular"):
            raise MemLMError(f"model.binding must be 'elementwise' or 'circular', got {binding!r}")
        if key_source not in ("content", "position", "mix"):
            raise MemLMError(f"model.key_source must be 'content', 'position' or 'mix', got {key_source!r}")
        if gate_mode not in ("parallel", "recurrent"):
            raise MemLMError(f"model.gate_mode must be 'parallel' or 'recurrent', got {gate_mode!r}")
        if scan_impl not in ("fused", "materialized"):
            raise MemLMError(f"model.scan_impl must be 'fused' or 'materialized', got {scan_impl!r}")
        if binding == "circular" and n_embd % 2:
            raise MemLMError(f"circular binding needs an even model.n_embd, got {n_embd}")
        # HAMT has no attention heads: its memory is n_slots full-width vectors, so only sizes are checked
        require_positive("model", n_layer=n_layer, n_embd=n_embd, n_slots=n_slots, scan_chunk=scan_chunk,
                         conv_kernel=conv_kernel, mem_expand=mem_expand)
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
            mem_expand=mem_expand,
            scan_impl=scan_impl,
        )
        self.model = HAMTModel(self.config)

    def forward(self, input_ids: torch.Tensor, state: Any = None) -> ModelOutput:
        return self.model(input_ids, state=state)

    def set_tokenizer(self, tokenizer: TextTokenizer) -> None:
        super().set_tokenizer(tokenizer)
        # document boundaries: the memory is cleared when the end-of-text separator is read
        self.config.reset_token_id = tokenizer.eos_id if self.reset_on_eos else None

    def configure_callbacks(self):
        from memlm.callbacks.tbptt import default_tbptt

        return default_tbptt(self, carry=self.carry_state)

    # -- recurrent state (memlm.core.state.RecurrentState) ---------------------------------
    # state = {"pos": long[], "layers": [{"M": [B, S, D], "conv": [B, K-1, D]}, ...]}
    def init_state(self, batch_size: int, device=None) -> dict:
        return self.model.init_state(batch_size, device)

    def detach_state(self, state: Any) -> Any:
        return detach_tensors(state)

    def reset_rows(self, state: dict, mask: torch.Tensor) -> dict:
        """Zero the slot memory and conv taps of the masked rows (what an end-of-text token does
        inside a chunk); ``pos`` is the batch's shared stream clock and stays."""
        mask = row_mask(mask, self.state_batch_size(state))
        layers = [{name: reset_tensor_rows(t, mask) for name, t in layer.items()} for layer in state["layers"]]
        return {"pos": state["pos"], "layers": layers}

    def state_batch_size(self, state: Any) -> int | None:
        return leading_batch_size(state)

    def state_to_dict(self, state: dict) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in flatten_tensors(state).items()}  # "pos", "layers.0.M", ...

    def state_from_dict(self, tensors: dict[str, torch.Tensor]) -> dict:
        state = unflatten_tensors(dict(tensors))
        if not isinstance(state, dict) or "pos" not in state or len(state.get("layers", [])) != self.config.n_layer:
            raise MemLMError(
                f"saved HAMT state {sorted(tensors)} does not fit this {self.config.n_layer}-layer model; "
                "resume with the checkpoint's config"
            )
        return state

    def flops_per_token(self, seq_len: int) -> float:
        c = self.config
        n = self.model.param_count(non_embedding=True)
        chunk = min(c.scan_chunk, max(1, seq_len))
        e = c.n_embd * c.mem_expand
        if c.gate_mode == "parallel" and c.scan_impl == "fused":
            # per layer and token (ChunkedSlotStates): the [C, C] products p b^T, b b^T, A b and the
            # reconstruction's A b (4 * 2*C*E), W G (2*S*C^2), the chunk-entry terms (~6 * 2*S*E)
            mem = c.n_layer * (8 * chunk * e + 2 * c.n_slots * chunk * chunk + 12 * c.n_slots * e)
        else:
            # per layer and token: chunked scan (2*S*C*D) + read/unbind/weights (~8*S*D)
            mem = c.n_layer * (2 * c.n_slots * chunk * e + 8 * c.n_slots * e)
        return 6 * n + 3 * mem

    def state_bytes(self, batch_size: int = 1) -> int:
        """Bytes of recurrent state per sequence (constant in the context length)."""
        c = self.config
        return batch_size * c.n_layer * (c.n_slots * c.mem_expand + c.conv_kernel - 1) * c.n_embd * 4 + 8
