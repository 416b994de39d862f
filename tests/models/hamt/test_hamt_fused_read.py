"""The fused parallel path (ChunkedSlotStates: reads through [C, C] matrices per chunk, no per-token
slot states) against the per-token recurrence and against the materialised path, values and gradients."""
import copy

import pytest
import torch

from memlm.models.hamt.memory import ChunkedSlotStates, entry_states, scan_reference
from memlm.models.hamt.model import HAMTConfig, HAMTModel


def _inputs(seed, B=3, T=45, S=4, E=10, reset_p=0.0):
    g0 = torch.Generator().manual_seed(seed)
    b = torch.randn(B, T, E, generator=g0, dtype=torch.float64)
    g = torch.rand(B, T, S, generator=g0, dtype=torch.float64)
    ld = torch.log(torch.rand(S, generator=g0, dtype=torch.float64) * 0.3 + 0.69)
    m0 = torch.randn(B, S, E, generator=g0, dtype=torch.float64)
    reset = (torch.rand(B, T, generator=g0) < reset_p) if reset_p else None
    return b, g, ld, m0, reset, g0


@pytest.mark.parametrize("reset_p", [0.0, 0.07])
@pytest.mark.parametrize("C", [1, 4, 16, 45, 64])  # 45 = T; 64 > T; 4 and 16 leave a partial last chunk
def test_dots_norms_mix_and_final_state_equal_the_explicit_states(reset_p, C):
    b, g, ld, m0, reset, g0 = _inputs(0, reset_p=reset_p)
    M = scan_reference(b, g, ld, m0, reset)  # [B, S, T, E]: every token's slot states
    st = ChunkedSlotStates(b, g, ld, m0, reset, C)
    p = torch.randn(b.shape, generator=g0, dtype=b.dtype)
    a = torch.randn(g.shape, generator=g0, dtype=b.dtype)
    torch.testing.assert_close(st.dots(p), torch.einsum("bte,bste->bts", p, M))
    torch.testing.assert_close(st.sq_norms(), M.pow(2).sum(-1).transpose(1, 2))
    torch.testing.assert_close(st.mix(a), torch.einsum("bts,bste->bte", a, M))
    torch.testing.assert_close(st.final, M[:, :, -1])
    if reset is not None:  # the resets really cut the past at some token
        assert bool(reset.any())


@pytest.mark.parametrize("n", [1, 5, 16, 17, 300])  # 300 > 16^2: two levels of blocks
@pytest.mark.parametrize("with_reset", [False, True])
def test_chunk_entry_states_equal_the_step_by_step_recurrence(n, with_reset):
    g0 = torch.Generator().manual_seed(n)
    B, S, E = 2, 3, 4
    ends = torch.randn(B, n, S, E, generator=g0, dtype=torch.float64)
    log_a = torch.log(torch.tensor([0.5, 0.97, 0.999], dtype=torch.float64))
    x0 = torch.randn(B, S, E, generator=g0, dtype=torch.float64)
    r = (torch.rand(B, n, generator=g0) < 0.05) if with_reset else None
    x, want = x0, []
    for k in range(n):
        want.append(x)
        a = log_a.exp()[None, :, None] * (1.0 if r is None else (~r[:, k]).to(x.dtype)[:, None, None])
        x = a * x + ends[:, k]
    torch.testing.assert_close(entry_states(ends, log_a, r, x0, block=16), torch.stack(want, 1))


def test_gradients_equal_the_explicit_states():
    b, g, ld, m0, reset, g0 = _inputs(1, T=30, reset_p=0.1)
    p = torch.randn(b.shape, generator=g0, dtype=b.dtype)
    a = torch.randn(g.shape, generator=g0, dtype=b.dtype)
    leaves = [t.clone().requires_grad_() for t in (b, g, ld, m0)]
    grads = []
    for fused in (True, False):
        for t in leaves:
            t.grad = None
        bb, gg, ll, mm = leaves
        if fused:
            st = ChunkedSlotStates(bb, gg, ll, mm, reset, 8)
            loss = (st.dots(p) * a).sum() + st.sq_norms().sqrt().sum() + (st.mix(a) * p).sum() + st.final.pow(2).sum()
        else:
            M = scan_reference(bb, gg, ll, mm, reset)
            loss = ((torch.einsum("bte,bste->bts", p, M) * a).sum() + M.pow(2).sum(-1).sqrt().sum()
                    + (torch.einsum("bts,bste->bte", a, M) * p).sum() + M[:, :, -1].pow(2).sum())
        loss.backward()
        grads.append([t.grad.clone() for t in leaves])
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y)


CONFIGS = [
    dict(binding="elementwise", key_source="content"),
    dict(binding="circular", key_source="content"),
    dict(binding="elementwise", key_source="position"),
    dict(binding="circular", key_source="mix"),
    dict(binding="elementwise", key_source="content", mem_expand=2),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda k: "-".join(map(str, k.values())))
def test_model_fused_equals_materialized_with_resets_and_carried_state(kw):
    torch.manual_seed(0)
    fused = HAMTModel(HAMTConfig(vocab_size=40, n_layer=2, n_embd=32, n_slots=4, scan_chunk=8, reset_token_id=3, **kw))
    ref = copy.deepcopy(fused)
    for blk in ref.blocks:
        blk.mem.scan_impl = "materialized"
    assert all(blk.mem.scan_impl == "fused" for blk in fused.blocks)  # the default
    x = torch.randint(4, 40, (3, 37))
    x[1, 17] = 3  # a document boundary inside a chunk
    x[2, 8] = 3  # and one on a chunk's first token
    outs = []
    for model in (fused, ref):
        st = model(x[:, :13]).state  # a carried state from a first piece
        out = model(x[:, 13:], {"pos": st["pos"], "layers": [{k: v.detach() for k, v in l.items()} for l in st["layers"]]})
        loss = out.logits.pow(2).mean() + sum(out.aux_losses.values())
        loss.backward()
        outs.append((out, [p.grad.clone() for p in model.parameters()]))
    (of, gf), (orf, gr) = outs
    torch.testing.assert_close(of.logits, orf.logits, atol=2e-6, rtol=1e-5)
    for lf, lr in zip(of.state["layers"], orf.state["layers"]):
        torch.testing.assert_close(lf["M"], lr["M"], atol=2e-6, rtol=1e-5)
    assert set(of.metrics) == set(orf.metrics)
    torch.testing.assert_close(of.metrics["recon_mse"], orf.metrics["recon_mse"])
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=2e-3)


def test_unknown_scan_impl_is_refused():
    with pytest.raises(ValueError, match="scan_impl"):
        HAMTModel(HAMTConfig(vocab_size=10, n_layer=1, n_embd=8, n_slots=2, scan_impl="magic"))
