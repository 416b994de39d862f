"""Per-row early exit by an entropy threshold (config ``exit_entropy_threshold``): out of
training, exactly the rows whose exit-head entropy is below it exit, and the meter drops by
their upper-layer work."""
import torch

from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.models.hmst.model import HMSTConfig, HMSTModel

ON = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, "expert_bias": 0.0}


def model(threshold):
    torch.manual_seed(0)
    cfg = HMSTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, d_model=32, d_ff=32, n_experts=4, top_k=2,
                     exit_layer=2, ssm_d_state=4, ssm_expand=1, controller_hidden=8, critic_d_model=8, critic_layers=1,
                     critic_heads=2, critic_max_len=16, exit_entropy_threshold=threshold)
    return HMSTModel(cfg).eval()


def entropies(m, x):
    with torch.no_grad():
        h = m.wte(x)
        cos, sin = m.rope(0, x.size(1), x.device)
        for i in range(m.cfg.exit_layer):
            h, _ = m.blocks[i](h, cos, sin)
        lp = torch.log_softmax(m.lm_head(m.exit_norm(h)[:, -1]).float(), -1)
        return -(lp.exp() * lp).sum(-1)


def test_rows_below_the_threshold_exit_and_cost_less():
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    m = model(None)
    ent = entropies(m, x)
    cut = float(ent.sort().values[1:3].mean())  # two rows below, two above
    with torch.no_grad():
        full = m(x, schedule=ON)
        m.cfg.exit_entropy_threshold = cut
        part = m(x, schedule=ON)
        m.cfg.exit_entropy_threshold = 1e9
        every = m(x, schedule=ON)
    assert torch.equal(part.exit_rows, ent < cut) and int(part.exit_rows.sum()) == 2
    assert bool(every.exit_rows.all()) and not bool(full.exit_rows.any())
    upper = full.compute["flops/upper"]
    assert part.compute["flops/upper"] == upper / 2 and every.compute["flops/upper"] == 0
    assert every.compute.total() < part.compute.total() < full.compute.total()
    # exiting rows take the exit head's logits; the others are unchanged
    keep = ~part.exit_rows
    assert torch.allclose(part.logits[keep], full.logits[keep], atol=1e-5)


def test_training_ignores_the_threshold_and_the_module_passes_it_through():
    m = model(1e9).train()
    out = m(torch.randint(0, 64, (2, 16)), schedule=ON)
    assert not bool(out.exit_rows.any())
    lm = HMSTLanguageModel(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=16, n_experts=2, top_k=1,
                           critic_d_model=8, critic_heads=2, exit_entropy_threshold=2.5)
    assert lm.model.cfg.exit_entropy_threshold == 2.5
