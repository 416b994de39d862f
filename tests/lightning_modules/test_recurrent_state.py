"""Every stateful module implements memlm.core.state.RecurrentState: reset_rows re-initialises the
masked rows only (and a reset row then behaves like a fresh stream), and state_to_dict /
state_from_dict round-trip exactly, also through torch.save / torch.load(weights_only=True)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from memlm.core.state import RecurrentState
from memlm.core.tokenizer import build_tokenizer
from memlm.lightning_modules.hamt.module import HAMTLanguageModel
from memlm.lightning_modules.hebbian.module import HebbianLanguageModel
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.htm.module import HTMLanguageModel
from memlm.lightning_modules.transformer import TransformerLM
from memlm.models.hmst.model import HMSTState


def saved_and_loaded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_the_stateful_modules_and_only_they_implement_the_protocol():
    assert isinstance(HAMTLanguageModel(vocab_size=16, n_layer=1, n_embd=16, n_slots=2), RecurrentState)
    assert isinstance(HMSTLanguageModel(**HMST_TINY), RecurrentState)
    assert isinstance(HTMLanguageModel(vocab_size=16, **HTM_TINY), RecurrentState)
    assert isinstance(HebbianLanguageModel(vocab_size=200), RecurrentState)
    transformer = TransformerLM(vocab_size=16, n_layer=1, n_head=2, n_embd=16, block_size=8)
    assert not isinstance(transformer, RecurrentState)  # TBPTT leaves it alone


# -- HAMT ---------------------------------------------------------------------------------------
def test_hamt_reset_rows_and_round_trip():
    torch.manual_seed(0)
    m = HAMTLanguageModel(vocab_size=16, n_layer=2, n_embd=16, n_slots=2, tau_min=4.0, tau_max=64.0).eval()
    x = torch.randint(0, 16, (3, 24))
    with torch.no_grad():
        state = m(x[:, :12]).state
        mask = torch.tensor([False, True, False])
        reset = m.reset_rows(state, mask)
        fresh = m.init_state(3)
        assert torch.equal(reset["pos"], state["pos"])  # the shared stream clock stays
        for new, old, init in zip(reset["layers"], state["layers"], fresh["layers"]):
            for k in ("M", "conv"):
                assert torch.equal(new[k][[0, 2]], old[k][[0, 2]]), k
                assert torch.equal(new[k][1], init[k][1]) and old[k][1].abs().sum() > 0, k
        # the reset row reads the next chunk exactly as a fresh stream would
        after_reset = m(x[:, 12:], state=reset).logits
        assert torch.allclose(after_reset[1], m(x[1:2, 12:]).logits[0], atol=1e-5)
        assert torch.allclose(after_reset[0], m(x[:, 12:], state=state).logits[0], atol=1e-6)

    flat = m.state_to_dict(state)
    assert set(flat) == {"pos", "layers.0.M", "layers.0.conv", "layers.1.M", "layers.1.conv"}
    back = m.state_from_dict(saved_and_loaded(flat))
    assert_same_tensors(m.state_to_dict(back), flat)
    assert m.state_batch_size(back) == 3
    with pytest.raises(Exception, match="does not fit"):
        m.state_from_dict({"pos": flat["pos"], "layers.0.M": flat["layers.0.M"], "layers.0.conv": flat["layers.0.conv"]})


# -- HMST ---------------------------------------------------------------------------------------
HMST_TINY = dict(
    vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=16, n_experts=2, top_k=1, exit_layer=1,
    ssm_d_state=4, ssm_expand=1, mem_top_k=0, episodic_capacity=8, episodic_top_k=2, controller_hidden=8,
    critic_d_model=8, critic_layers=1, critic_heads=2, critic_max_len=16,
)


def test_hmst_reset_rows_and_round_trip():
    torch.manual_seed(0)
    m = HMSTLanguageModel(**HMST_TINY).eval()  # eval gates: no exit, episodic and semantic on (deterministic)
    x = torch.randint(0, 32, (2, 32))
    with torch.no_grad():
        out = m(x[:, :16])
        state = out.state
        m.episodic.add_batch(state.ssm[-1][1].float(), out.pooled.float(), [(0, 16)] * 2)  # episodes to read
        mask = torch.tensor([True, False])
        reset = m.reset_rows(state, mask)
        assert reset.pos == state.pos == 16
        for (c, s), (c0, s0) in zip(reset.ssm, state.ssm):
            assert torch.equal(c[1], c0[1]) and torch.equal(s[1], s0[1])
            assert not c[0].any() and not s[0].any() and s0[0].abs().sum() > 0
        assert reset.prev_valid.tolist() == [False, True] and torch.equal(reset.prev_pooled[1], state.prev_pooled[1])
        # row 0 now reads the next chunk like a fresh stream (no SSM history, no episodes) ...
        logits = m(x[:, 16:], state=reset).logits
        assert torch.allclose(logits[0], m(x[:, 16:], state=None).logits[0], atol=1e-5)
        assert torch.allclose(logits[1], m(x[:, 16:], state=state).logits[1], atol=1e-6)
        # ... which zeroing prev_pooled alone would not give: a zero query still retrieves episodes
        zeroed = HMSTState(ssm=reset.ssm, pos=reset.pos, prev_pooled=reset.prev_pooled)
        assert not torch.allclose(m(x[:, 16:], state=zeroed).logits[0], logits[0], atol=1e-5)

    for st in (state, reset, m.init_state(2)):
        flat = m.state_to_dict(st)
        back = m.state_from_dict(saved_and_loaded(flat))
        assert_same_tensors(m.state_to_dict(back), flat)
        assert back.pos == st.pos and (back.prev_pooled is None) == (st.prev_pooled is None)
        assert (back.prev_valid is None) == (st.prev_valid is None)
    assert set(m.state_to_dict(state)) == {"pos", "ssm.0.conv", "ssm.0.ssm", "prev_pooled", "prev_valid", "prev_sim"}


# -- HTM ----------------------------------------------------------------------------------------
HTM_TINY = dict(
    encoder_size=128, encoder_active_bits=8, columns=128, sp_density=0.0625, cells_per_column=4,
    activation_threshold=4, min_threshold=3, max_new_synapse_count=8, seed=5,
)


def test_htm_reset_rows_and_round_trip():
    text = "the quick brown fox jumps over the lazy dog. " * 4
    tok = build_tokenizer("char", [text])
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    m = HTMLanguageModel(vocab_size=tok.vocab_size, **HTM_TINY)
    m.set_tokenizer(tok)
    x = torch.from_numpy(ids[:60].reshape(3, 20))
    m.training_step({"input_ids": x, "targets": torch.roll(x, -1, 1), "stream": True, "first": True}, 0)
    state = m.carried_state
    assert m.state_batch_size(state) == 3 and all(len(s.active) > 0 for s in state)

    reset = m.reset_rows(state, torch.tensor([False, True, False]))
    assert len(reset[1].active) == 0 and len(reset[1].winners) == 0
    for b in (0, 2):
        np.testing.assert_array_equal(reset[b].active, state[b].active)
        np.testing.assert_array_equal(reset[b].winners, state[b].winners)
    assert len(state[1].active) > 0  # the input state is not modified

    back = m.state_from_dict(saved_and_loaded(m.state_to_dict(state)))
    assert len(back) == 3
    for a, b in zip(back, state):
        assert a.active.dtype == b.active.dtype == np.int32
        np.testing.assert_array_equal(a.active, b.active)
        np.testing.assert_array_equal(a.winners, b.winners)
    m.carried_state = None  # the protocol's fresh start
    assert m.carried_state is None and m._streams["train"] == []


# -- Hebbian ------------------------------------------------------------------------------------
def test_hebbian_reset_rows_round_trip_and_the_empty_context():
    m = HebbianLanguageModel(vocab_size=200, seed=1)
    for text in ["the cat sat on the mat", "the dog sat on the log", "the cat sat on the log"] * 3:
        m.learner.learn_utterance(text, close=False)  # leaves the context open: something to carry
    state = m.carried_state
    assert m.state_batch_size(state) == 1 and int(state["cursor"][0, 0]) > 0

    assert_same_tensors(m.reset_rows(state, torch.tensor([False])), state)
    assert_same_tensors(m.reset_rows(state, torch.tensor([True])), m.init_state(1))
    flat = m.state_to_dict(state)
    assert_same_tensors(m.state_from_dict(saved_and_loaded(flat)), flat)

    net = m.learner.net
    probe = m.tokenizer.encode(" on the mat")
    carried = net.feed(probe, learn=False)
    m.carried_state = m.init_state(1)  # the empty context predicts what a reset network predicts
    from_empty = net.feed(probe, learn=False)
    net.reset()
    assert np.array_equal(from_empty, net.feed(probe, learn=False))
    m.carried_state = state  # and the saved context comes back exactly
    assert np.array_equal(net.feed(probe, learn=False), carried)
    assert not np.array_equal(carried, from_empty)
