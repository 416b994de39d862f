"""HMST gates decide before the work: each gate that is off lowers the compute meter's count,
skips its module calls (FAISS search, reader, SSM, upper blocks) for exactly its rows, and the
meter's torch FLOPs equal FlopCounterMode's."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memlm.core.errors import MemLMError
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.language_model import OptimizerConfig

ON = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, "expert_bias": 0.0}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = HMSTLanguageModel(
        vocab_size=64, block_size=16, n_layer=4, n_head=2, d_model=32, d_ff=32, n_experts=4, top_k=2, exit_layer=2,
        ssm_d_state=4, ssm_expand=1, mem_top_k=2, mem_max_items=1000, episodic_capacity=16, controller_hidden=16,
        critic_d_model=16, critic_layers=1, critic_heads=2, critic_max_len=32, optimizer=OptimizerConfig(warmup_steps=1),
    ).eval()
    g = torch.Generator().manual_seed(1)
    m.semantic.add(torch.randn(50, 32, generator=g), torch.randn(50, 32, generator=g))
    m.episodic.add_batch(torch.randn(6, 32, 4, generator=g), torch.randn(6, 32, generator=g), [(0, 16)] * 6)
    return m


class Calls:
    """Rows seen by each watched sub-module / the FAISS search."""

    def __init__(self, m):
        self.rows: dict[str, list[int]] = {}
        self.handles = []
        for name, mod in (("ssm", m.model.ssm[0]), ("reader", m.model.reader), ("upper", m.model.blocks[-1])):
            self.handles.append(mod.register_forward_hook(lambda mod, a, o, n=name: self.rows.setdefault(n, []).append(a[0].size(0))))
        self.search = m.semantic.search
        self.mem = m.semantic

        def spy(q, k):
            self.rows.setdefault("faiss", []).append(q.size(0))
            return self.search(q, k)

        m.semantic.search = spy

    def close(self):
        for h in self.handles:
            h.remove()
        self.mem.search = self.search


def run(m, schedule=None, decision=None, B=4):
    x = torch.randint(0, 64, (B, 16), generator=torch.Generator().manual_seed(2))
    state = m.model.init_state(B, "cpu")
    state.prev_pooled = torch.randn(B, 32, generator=torch.Generator().manual_seed(3))  # a previous segment to read
    calls = Calls(m)
    try:
        with torch.no_grad():
            out = m.model(x, state, memory=m.semantic, episodic_store=m.episodic, schedule=schedule or ON,
                          decision=decision, return_exit_logits=False)
    finally:
        calls.close()
    return out, calls.rows


def forced(m, **gates):
    out, _ = run(m)
    d = out.decision
    for name, values in gates.items():
        setattr(d, name, torch.tensor(values, dtype=torch.float32))
    return d


def test_all_on_reads_every_memory_for_every_row(module):
    out, rows = run(module)
    assert rows["faiss"] == [4 * 16]  # mem_query_stride 1: one query per token per row
    assert rows["ssm"] == [4] and rows["reader"] == [4] and rows["upper"] == [4]
    assert out.compute.faiss_queries == 64 and out.compute.total() > out.compute.torch_flops > 0


def test_semantic_off_means_no_faiss_search_and_lower_cost(module):
    full, _ = run(module)
    out, rows = run(module, {**ON, "semantic": 0.0})
    assert "faiss" not in rows and out.compute.faiss_queries == 0
    assert rows["reader"] == [4]  # the episodes are still read
    assert out.compute.total() < full.compute.total()
    assert out.compute["flops/reader"] < full.compute["flops/reader"]  # fewer memory slots attended


def test_semantic_off_per_row_searches_only_the_rows_on(module):
    d = forced(module, semantic=[1, 0, 0, 1], episodic=[0, 0, 0, 0])
    out, rows = run(module, decision=d)
    assert rows["faiss"] == [2 * 16] and out.compute.faiss_queries == 32
    assert rows["reader"] == [2]  # rows with neither memory skip the reader
    assert (out.retrieved_ids[[1, 2]] == -1).all() and (out.retrieved_ids[[0, 3]] >= 0).any()


def test_episodic_off_means_no_ssm_and_the_state_is_kept(module):
    full, _ = run(module)
    out, rows = run(module, {**ON, "episodic": 0.0})
    assert "ssm" not in rows
    assert out.compute["flops/ssm"] == 0 and out.compute["flops/episodic_store"] == 0
    assert out.compute.total() < full.compute.total()
    assert torch.equal(out.state.ssm[0][1], torch.zeros_like(out.state.ssm[0][1]))  # not advanced
    d = forced(module, episodic=[1, 0, 1, 0], semantic=[0, 0, 0, 0])
    mixed, rows = run(module, decision=d)
    assert rows["ssm"] == [2] and rows["reader"] == [2]
    assert mixed.state.ssm[0][1][[1, 3]].abs().sum() == 0 and mixed.state.ssm[0][1][[0, 2]].abs().sum() > 0


def test_exit_skips_upper_layers_and_every_memory_read(module):
    full, _ = run(module)
    out, rows = run(module, {**ON, "exit": 1.0})
    assert not {"ssm", "reader", "upper", "faiss"} & set(rows)
    assert out.compute.faiss_queries == 0 and out.compute.total() < 0.7 * full.compute.total()
    d = forced(module, exit=[1, 0, 0, 1])
    mixed, rows = run(module, decision=d)
    assert rows == {"faiss": [2 * 16], "ssm": [2], "reader": [2], "upper": [2]}


def test_meter_torch_flops_equal_flop_counter_mode(module):
    for schedule in (ON, {**ON, "semantic": 0.0}, {**ON, "episodic": 0.0}, {**ON, "exit": 1.0}):
        mode = FlopCounterMode(display=False)
        with mode:
            out, _ = run(module, schedule)
        # FlopCounterMode does not count the CPU flash-attention kernel: add QK^T and AV from the shapes
        B, T, D = 4, 16, 32
        sdpa = 4 * T * T * D * B * out.layers_run
        assert out.compute.torch_flops == pytest.approx(mode.get_total_flops() + sdpa, rel=1e-6), schedule


def test_expert_bias_gate_moves_routing_to_the_chosen_expert(module):
    base, _ = run(module)
    d = forced(module, expert_choice=[3, 3, 3, 3])
    d.expert_choice = d.expert_choice.long()
    d.expert_bias = torch.nn.functional.one_hot(d.expert_choice, 5)[:, :4].float() * module.model.controller.bias_scale
    out, _ = run(module, decision=d)
    # load is averaged over all 4 layers, 2 of them biased: expert 3's share must rise clearly
    assert float(out.metrics["expert_load_3"]) > float(base.metrics["expert_load_3"]) + 0.1


def test_windowed_keys_are_the_causal_mean_of_exit_states_across_segments_and_steps():
    """mem_key_window: the retrieval key of token t is the mean of the exit-layer states of
    tokens t-w+1..t of the stream, whether it comes in one call, in carried chunks or one token
    at a time with a KV cache; a reset row starts its window afresh."""
    from memlm.lightning_modules.hmst.module import HMSTLanguageModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=8, d_ff=8, n_experts=2, top_k=1, exit_layer=1,
               ssm_d_state=2, ssm_expand=1, controller_hidden=4, critic_d_model=4, critic_layers=1, critic_heads=2)
    plain = HMSTLanguageModel(**cfg).eval()
    windowed = HMSTLanguageModel(**cfg, mem_key_window=3).eval()
    windowed.load_state_dict(plain.state_dict())
    x = torch.randint(0, 32, (2, 20))

    def run(m, cuts, cache=False, reset_at=None):
        state, keys = (m.model.init_state(2, "cpu", use_cache=True) if cache else None), []
        for a, b in zip(cuts[:-1], cuts[1:]):
            if reset_at == a:
                state = m.reset_rows(state, torch.tensor([True, False]))
            out = m.model(x[:, a:b], state, use_cache=cache)
            state, keys = out.state, keys + [out.mem_keys]
        return torch.cat(keys, 1)

    def window_mean(h, starts=(0,)):
        out = []
        for t in range(h.size(1)):
            lo = max([t - 2] + [s for s in starts if s <= t])
            out.append(h[:, lo:t + 1].mean(1))
        return torch.stack(out, 1)

    with torch.no_grad():
        for cuts, cache in (([0, 20], False), ([0, 5, 12, 20], False), (list(range(7)), True)):
            torch.testing.assert_close(run(windowed, cuts, cache), window_mean(run(plain, cuts, cache)), rtol=1e-5, atol=1e-6)
        cuts = [0, 5, 12, 20]
        got = run(windowed, cuts, reset_at=5)
        h = run(plain, cuts, reset_at=5)
        torch.testing.assert_close(got[0], window_mean(h[:1], starts=(0, 5))[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], window_mean(h[1:])[0], rtol=1e-5, atol=1e-6)
        # the carried window survives a checkpoint of the stream state
        state = windowed.model(x[:, :5]).state
        back = windowed.state_from_dict(windowed.state_to_dict(state))
        torch.testing.assert_close(windowed.model(x[:, 5:12], back).mem_keys, windowed.model(x[:, 5:12], state).mem_keys)
    with pytest.raises(MemLMError, match="mem_key_window must be an integer >= 1"):
        HMSTLanguageModel(**cfg, mem_key_window=0)
