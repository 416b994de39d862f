"""HAMT: a decoder whose attention is replaced by a fixed-size holographic slot memory.

Each block is ``x + Memory(norm(x))`` then ``x + MLP(norm(x))``; the memory state of every layer
(``M`` [B, S, D] plus a K-1 token convolution buffer) and the absolute position are the whole
recurrent state, so a generated token costs the same at position 10 and at position 64k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from memlm.models.hamt.memory import HolographicMemory
from memlm.core.outputs import ModelOutput
from memlm.models.transformer import MLP


@dataclass
class HAMTConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_embd: int = 128
    n_slots: int = 8
    binding: str = "elementwise"  # elementwise (bipolar keys) | circular (FFT)
    key_source: str = "content"  # content | position | mix (half content, half positional dimensions)
    gate_mode: str = "parallel"  # parallel (chunked, linear in M) | recurrent (gate reads slot state; scan)
    scan_chunk: int = 8
    conv_kernel: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    tau_min: float = 4.0
    tau_max: float = 4096.0
    key_seed: int = 0
    aux_weight: float = 0.1
    reset_token_id: int | None = None  # memory is cleared when this token (document separator) is read
    compile_scan: bool = False
    mem_expand: int = 1  # slot key/item dimension = mem_expand * n_embd (capacity; 1 = the original design)
    # parallel gate mode: "fused" reads the slot states through [C, C] matrices per chunk
    # (ChunkedSlotStates); "materialized" builds every token's slot states (the reference)
    scan_impl: str = "fused"


class HAMTBlock(nn.Module):
    def __init__(self, cfg: HAMTConfig, layer: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mem = HolographicMemory(
            cfg.n_embd,
            n_slots=cfg.n_slots,
            binding=cfg.binding,
            key_source=cfg.key_source,
            gate_mode=cfg.gate_mode,
            scan_chunk=cfg.scan_chunk,
            conv_kernel=cfg.conv_kernel,
            tau_min=cfg.tau_min,
            tau_max=cfg.tau_max,
            key_seed=cfg.key_seed + 7919 * layer,
            compile_scan=cfg.compile_scan,
            mem_expand=cfg.mem_expand,
            scan_impl=cfg.scan_impl,
        )
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = MLP(cfg.n_embd, int(cfg.mlp_ratio * cfg.n_embd), False, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, state, pos0, reset, want_aux, want_stats):
        m_out, new_state, extras = self.mem(self.ln1(x), state, pos0, reset, want_aux, want_stats)
        x = x + self.drop(m_out)
        return x + self.mlp(self.ln2(x)), new_state, extras


class HAMTModel(nn.Module):
    """``forward(ids [B,T], state) -> ModelOutput``; state = {"pos": long[], "layers": [{"M", "conv"}]}."""

    def __init__(self, cfg: HAMTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(HAMTBlock(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.collect_stats = False  # set by the MemoryAnalysis callback for one step
        self.last_stats: list[dict] = []
        for name, p in self.named_parameters():
            if p.ndim == 2 and not name.endswith("w_gate_state"):
                nn.init.normal_(p, mean=0.0, std=0.02)
            if name.endswith("w_out.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        c = self.cfg
        return {
            "pos": torch.zeros((), dtype=torch.long, device=device),
            "layers": [
                {
                    "M": torch.zeros(batch_size, c.n_slots, c.n_embd * c.mem_expand, device=device, dtype=dtype),
                    "conv": torch.zeros(batch_size, c.conv_kernel - 1, c.n_embd, device=device, dtype=dtype),
                }
                for _ in range(c.n_layer)
            ],
        }

    def forward(self, input_ids: torch.Tensor, state: dict | None = None) -> ModelOutput:
        B, T = input_ids.shape
        pos0 = int(state["pos"]) if state is not None else 0
        layer_states = state["layers"] if state is not None else [None] * len(self.blocks)
        reset = None
        if self.cfg.reset_token_id is not None:
            reset = input_ids == int(self.cfg.reset_token_id)
        want_aux = self.training and self.cfg.aux_weight > 0 or self.collect_stats
        x = self.wte(input_ids)
        new_layers, extras = [], []
        for blk, st in zip(self.blocks, layer_states):
            x, ns, ex = blk(x, st, pos0, reset, want_aux, self.collect_stats)
            new_layers.append(ns)
            extras.append(ex)
        hidden = self.ln_f(x)
        logits = self.lm_head(hidden)
        new_state = {"pos": torch.tensor(pos0 + T, dtype=torch.long, device=input_ids.device), "layers": new_layers}
        aux, metrics = {}, {}
        if want_aux:
            recon = torch.stack([e["recon_mse"] for e in extras]).mean()
            if self.training and self.cfg.aux_weight > 0:
                aux["recon"] = self.cfg.aux_weight * recon
            metrics["recon_mse"] = recon.detach()
            metrics["fidelity"] = torch.stack([e["fidelity"] for e in extras]).mean()
        metrics["gate_mean"] = torch.stack([e["gate_mean"] for e in extras]).mean()
        metrics["read_entropy"] = torch.stack([e["read_entropy"] for e in extras]).mean()
        if self.collect_stats:
            self.last_stats = [{k: v.detach().cpu() for k, v in e.items()} for e in extras]
        return ModelOutput(logits=logits, state=new_state, aux_losses=aux, metrics=metrics, hidden=hidden)

    def param_count(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n
