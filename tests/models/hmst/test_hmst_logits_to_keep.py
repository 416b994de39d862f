"""``logits_to_keep``: a prefill that samples from its last position gets exactly that
position's logits of a full forward, pays for no others, and, when every searched row exits
(the kNN-LM output is its only memory read), searches memory at the kept positions alone."""

import pytest
import torch

from memlm.core.meter import FAISS_QUERIES
from memlm.lightning_modules.hmst.module import HMSTLanguageModel

V, T, D = 48, 16, 32
ON = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, "expert_bias": 0.0}
EXIT_READ = {**ON, "exit": 1.0, "episodic": 0.0}


def build(stride: int) -> HMSTLanguageModel:
    torch.manual_seed(0)
    m = HMSTLanguageModel(
        vocab_size=V, block_size=T, n_layer=2, n_head=2, d_model=D, d_ff=32, n_experts=2, top_k=1, exit_layer=1,
        ssm_d_state=4, ssm_expand=1, mem_top_k=3, mem_query_stride=stride, mem_value="next_token",
        mem_knn_lambda=0.5, mem_knn_temperature=0.05, episodic_capacity=8, controller_hidden=8,
        critic_d_model=16, critic_layers=1, critic_heads=2, critic_max_len=32,
    ).eval()
    g = torch.Generator().manual_seed(1)
    m.semantic.add(torch.randn(40, D, generator=g), m.model.wte.weight.detach()[torch.randint(0, V, (40,), generator=g)])
    return m


def run(m, x, schedule, keep, cache):
    state = m.model.init_state(x.size(0), x.device, use_cache=cache)
    with torch.no_grad():
        return m.model(x, state, memory=m.semantic, gate_mode="schedule", schedule=schedule, use_cache=cache,
                       return_exit_logits=False, logits_to_keep=keep)


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("schedule", [ON, EXIT_READ], ids=["all_on", "exit_read"])
@pytest.mark.parametrize("cache", [False, True], ids=["no_cache", "kv_cache"])
def test_kept_logits_equal_the_full_forward(stride, schedule, cache):
    m = build(stride)
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    full, last2 = run(m, x, schedule, 0, cache), run(m, x, schedule, 2, cache)
    assert last2.logits.shape == (2, 2, V)
    assert torch.allclose(last2.logits, full.logits[:, -2:], atol=1e-5)
    q_full = full.compute.counts[FAISS_QUERIES]
    q_kept = last2.compute.counts[FAISS_QUERIES]
    if schedule is EXIT_READ:  # only the kept positions are searched
        assert q_kept == 2 * len({t // stride for t in (T - 2, T - 1)}) and q_full == 2 * len(range(0, T, stride))
    else:  # the reader of the upper path needs every queried position
        assert q_kept == q_full
    assert last2.compute.total() < full.compute.total()


def test_the_kept_last_position_is_what_the_engine_samples_from():
    m = build(1)
    x = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(4))
    plain = HMSTLanguageModel(**{**dict(m.hparams), "mem_knn_lambda": 0.0}).eval()
    plain.load_state_dict(m.state_dict())
    plain.semantic = m.semantic
    kept = run(m, x, EXIT_READ, 1, True).logits[:, -1]
    bare = run(plain, x, EXIT_READ, 1, True).logits[:, -1]
    assert not torch.allclose(kept, bare, atol=1e-4)  # the kNN mix was applied at the kept position


@pytest.mark.parametrize("stride", [1, 3])
def test_score_mask_keeps_the_scored_logits_of_a_row_that_exits(stride):
    m = build(stride)
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 5:8] = True
    mask[1, -1] = True
    with torch.no_grad():
        full = m.model(x, memory=m.semantic, gate_mode="schedule", schedule=EXIT_READ, return_exit_logits=True)
        part = m.model(x, memory=m.semantic, gate_mode="schedule", schedule=EXIT_READ, return_exit_logits=True,
                       score_mask=mask)
    assert torch.allclose(part.logits[mask], full.logits[mask], atol=1e-5)  # scored: the kNN-LM output as ever
    need = {(r, t // stride) for r, t in mask.nonzero().tolist()}
    # a position whose query was not searched has the exit head's distribution alone
    alone = torch.tensor([[(r, t // stride) not in need for t in range(T)] for r in range(2)])
    assert alone.any()
    assert torch.allclose(part.logits[alone], torch.log_softmax(part.exit_logits[alone], -1), atol=1e-5)
    assert not torch.allclose(full.logits[alone], part.logits[alone], atol=1e-3)  # where the full forward mixed
    assert part.compute.counts[FAISS_QUERIES] == len(need) < full.compute.counts[FAISS_QUERIES]
