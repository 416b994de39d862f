"""The kNN-LM output (``mem_knn_lambda``): a row that reads semantic memory predicts
(1 - lambda) p_model + lambda p_kNN, p_kNN built from the retrieved items' tokens; an item
below ``mem_knn_min_score`` is ignored; with it on, an exiting row reads memory too."""

import pytest
import torch
import torch.nn.functional as F

from memlm.core.errors import MemLMError
from memlm.lightning_modules.hmst.module import HMSTLanguageModel

V, T, D = 48, 16, 32
ON = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, "expert_bias": 0.0}
EXIT = {**ON, "exit": 1.0}


def build(lam: float, min_score: float = 0.0) -> HMSTLanguageModel:
    torch.manual_seed(0)
    return HMSTLanguageModel(
        vocab_size=V, block_size=T, n_layer=2, n_head=2, d_model=D, d_ff=32, n_experts=2, top_k=1, exit_layer=1,
        ssm_d_state=4, ssm_expand=1, mem_top_k=3, mem_query_stride=1, mem_value="next_token", mem_knn_lambda=lam,
        mem_knn_temperature=0.05, mem_knn_min_score=min_score, episodic_capacity=8, controller_hidden=8,
        critic_d_model=16, critic_layers=1, critic_heads=2, critic_max_len=32,
    ).eval()


@pytest.fixture()
def pair():
    """A kNN-LM module and a lambda-0 twin with the same weights and the same memory, which
    holds this sequence's own keys valued by its next tokens (plus distractors)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (2, T), generator=g)
    y = torch.randint(0, V, (2, T), generator=g)
    knn, plain = build(0.5), build(0.0)
    plain.load_state_dict(knn.state_dict())
    with torch.no_grad():
        keys = plain(x, gate_mode="schedule", schedule=ON).mem_keys  # with an empty memory
    knn.semantic.add(keys.reshape(-1, D), knn.model.wte.weight.detach()[y.reshape(-1)])
    knn.semantic.add(torch.randn(20, D, generator=g), knn.model.wte.weight.detach()[torch.randint(0, V, (20,), generator=g)])
    plain.semantic = knn.semantic
    return knn, plain, x, y, keys


def test_mixture_matches_a_hand_computed_knn_lm(pair):
    knn, plain, x, y, keys = pair
    with torch.no_grad():
        got = F.log_softmax(knn(x, gate_mode="schedule", schedule=ON).logits, -1)
        model_p = F.softmax(plain(x, gate_mode="schedule", schedule=ON).logits, -1)
    # the reference: the items' tokens from their stored position (not from the embedding)
    res = knn.semantic.search(keys.reshape(-1, D), 3)
    token_of = torch.cat([y.reshape(-1), torch.full((20,), -1)])  # distractors' tokens, looked up below
    dis_vals = knn.semantic.get_values(torch.arange(2 * T, 2 * T + 20))[0]
    emb = knn.model.wte.weight.detach()
    token_of[2 * T:] = torch.cdist(dis_vals.float(), emb.float()).argmin(-1)
    w = (res.scores.float() / 0.05).softmax(-1)
    p_knn = torch.zeros(2 * T, V).scatter_add_(-1, token_of[res.ids], w).view(2, T, V)
    want = torch.log(0.5 * model_p + 0.5 * p_knn)
    assert torch.allclose(got, want, atol=1e-5)
    # each position's own item (cosine 1) is among its matches: the stored next token gains everywhere
    assert (got.gather(-1, y.unsqueeze(-1)).exp() > 0.2 + model_p.gather(-1, y.unsqueeze(-1))).all()


def test_below_min_score_keeps_the_model_distribution(pair):
    knn, plain, x, _, _ = pair
    knn.model.cfg.mem_knn_min_score = 1.5  # above any cosine
    with torch.no_grad():
        got = F.log_softmax(knn(x, gate_mode="schedule", schedule=ON).logits, -1)
        want = F.log_softmax(plain(x, gate_mode="schedule", schedule=ON).logits, -1)
    assert torch.allclose(got, want, atol=1e-5)


def test_an_exiting_row_reads_memory_only_with_the_knn_output(pair):
    knn, plain, x, y, _ = pair
    with torch.no_grad():
        out = knn(x, gate_mode="schedule", schedule=EXIT, return_exit_logits=True)
        bare = knn(x, gate_mode="schedule", schedule={**EXIT, "semantic": 0.0}, return_exit_logits=True)
        off = plain(x, gate_mode="schedule", schedule=EXIT, return_exit_logits=True)
    exit_lp = F.log_softmax(out.exit_logits, -1)
    assert out.compute.faiss_queries > 0 and out.retrieved_ids is not None
    assert not torch.allclose(F.log_softmax(out.logits, -1), exit_lp, atol=1e-3)
    # the copy wins: the stored next token is far likelier than under the bare exit head
    gain = (F.log_softmax(out.logits, -1) - exit_lp).gather(-1, y.unsqueeze(-1))
    assert gain.mean() > 1.0
    # semantic gate off, or lambda 0: the exit head alone, and no search
    assert torch.allclose(F.log_softmax(bare.logits, -1), exit_lp, atol=1e-6)
    assert torch.allclose(F.log_softmax(off.logits, -1), F.log_softmax(off.exit_logits, -1), atol=1e-6)
    assert bare.compute.faiss_queries == 0 and off.compute.faiss_queries == 0


def test_embedding_keys_match_the_same_words_after_another_context():
    torch.manual_seed(0)
    kw = dict(vocab_size=V, block_size=T, n_layer=2, n_head=2, d_model=D, d_ff=32, n_experts=2, top_k=1, exit_layer=1,
              ssm_d_state=4, ssm_expand=1, mem_key_window=4, episodic_capacity=8, controller_hidden=8,
              critic_d_model=16, critic_layers=1, critic_heads=2, critic_max_len=32)
    lexical = HMSTLanguageModel(mem_key_source="embedding", **kw).eval()
    contextual = HMSTLanguageModel(mem_key_source="exit", **kw).eval()
    contextual.load_state_dict(lexical.state_dict())
    g = torch.Generator().manual_seed(4)
    words = torch.randint(0, V, (6,), generator=g)
    a = torch.cat([torch.randint(0, V, (10,), generator=g), words])[None]
    b = torch.cat([torch.randint(0, V, (10,), generator=g), words])[None]  # same last 6 tokens, other context
    with torch.no_grad():
        ka, kb = (lexical(x, gate_mode="schedule", schedule=ON).mem_keys[0, -3:] for x in (a, b))
        ca, cb = (contextual(x, gate_mode="schedule", schedule=ON).mem_keys[0, -3:] for x in (a, b))
    assert torch.allclose(ka, kb, atol=1e-6)  # windows inside the shared words: identical keys
    assert not torch.allclose(ca, cb, atol=1e-3)  # exit-layer states carry the context
    with pytest.raises(MemLMError, match="mem_key_source"):
        HMSTLanguageModel(mem_key_source="hidden", **kw)


def test_knn_settings_are_checked():
    with pytest.raises(MemLMError, match="mem_knn_lambda"):
        build(1.0)
    with pytest.raises(MemLMError, match="next_token"):
        HMSTLanguageModel(vocab_size=V, mem_knn_lambda=0.5)
