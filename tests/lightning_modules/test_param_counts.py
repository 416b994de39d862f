"""What the leaderboard and the W&B run config report as a model's size: HMST's active parameters
count only the top-k experts; HTM, which has no nn.Parameters, counts its learned values."""
from __future__ import annotations

import numpy as np

from memlm.apps.run_info import parameter_counts
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.htm.module import HTMLanguageModel


def test_hmst_active_parameters_leave_out_the_unchosen_experts():
    model = HMSTLanguageModel(vocab_size=259, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=32, n_experts=4,
                              top_k=1)
    counts = parameter_counts(model)
    per_expert = sum(p[0].numel() for p in model.model.blocks[0].moe.experts.parameters())  # one expert's slice
    n_moe_layers = sum(1 for b in model.model.blocks if getattr(b, "moe", None) is not None)
    assert counts["total"] - counts["active"] == n_moe_layers * (4 - 1) * per_expert


def test_htm_size_is_its_learned_values_and_grows_with_learning():
    model = HTMLanguageModel(vocab_size=16, encoder_size=128, encoder_active_bits=8, columns=128, cells_per_column=4,
                             sp_learn=False, seed=0)
    assert parameter_counts(model)["total"] == 0  # nothing for an optimizer
    before = model.num_learned_values()
    assert before == model.classifier.weights.size + int(model.sp.potential.sum())  # no synapses yet
    model.learn_text(list(np.tile(np.arange(8), 4)))
    assert model.num_learned_values() - before == model.tm.num_synapses > 0
