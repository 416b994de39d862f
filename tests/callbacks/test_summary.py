"""The model summary prints total and active parameters and FLOPs per token, never 'Total FLOPs: 0'."""
from __future__ import annotations

import torch

from memlm.callbacks.summary import parameter_counts, summary_lines
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.transformer import TransformerLM

DATA = [(" ", ["0"]), ("Name", ["model"]), ("Type", ["GPT"]), ("Params", ["1 K"]), ("FLOPs", ["0"])]


def test_transformer_summary_has_flops_per_token_and_no_zero_flops_column():
    m = TransformerLM(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    lines = summary_lines(m, DATA, total_flops=0, seq_len=16)
    text = "\n".join(lines)
    assert "FLOPs  " not in lines[0] and "Total FLOPs" not in text
    total = sum(p.numel() for p in m.parameters())
    assert f"{m.flops_per_token(16) / 1e3:.1f} K  training FLOPs per token at context 16" in text
    assert "active params" not in text and parameter_counts(m) == (total, total)


def test_moe_summary_states_active_params_below_total():
    with torch.device("meta"):
        m = HMSTLanguageModel(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32, n_experts=4, top_k=1)
    total, active = parameter_counts(m)
    counts = m.model.param_counts()
    assert active == counts["active"] < total
    assert any("active params per token" in ln for ln in summary_lines(m, DATA, 0, 32))


def test_a_measured_flops_column_is_kept():
    m = TransformerLM(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    assert "FLOPs" in summary_lines(m, DATA[:-1] + [("FLOPs", ["5 K"])], total_flops=5000, seq_len=16)[0]
