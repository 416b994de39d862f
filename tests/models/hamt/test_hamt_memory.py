"""The memory recurrence: chunked parallel form vs per-token reference, chunking invariance,
determinism in eval, document-boundary resets, constant state size."""
import pytest
import torch
import torch.nn.functional as F

from memlm.models.hamt.memory import scan_chunk, scan_reference
from memlm.models.hamt.model import HAMTConfig, HAMTModel


def _chunked(b, g, ld, m0, reset, C):
    out, m = [], m0
    for c0 in range(0, b.size(1), C):
        r = None if reset is None else reset[:, c0:c0 + C]
        mm = scan_chunk(b[:, c0:c0 + C], g[:, c0:c0 + C], ld, m, r)
        m = mm[:, :, -1]
        out.append(mm)
    return torch.cat(out, 2)


@pytest.mark.parametrize("with_reset", [False, True])
def test_chunked_scan_matches_per_token_reference(with_reset):
    g0 = torch.Generator().manual_seed(0)
    B, T, S, D = 3, 70, 5, 12
    b = torch.randn(B, T, D, generator=g0)
    g = torch.rand(B, T, S, generator=g0)
    ld = torch.log(torch.rand(S, generator=g0) * 0.3 + 0.69)
    m0 = torch.randn(B, S, D, generator=g0)
    reset = (torch.rand(B, T, generator=g0) < 0.08) if with_reset else None
    ref = scan_reference(b, g, ld, m0, reset)
    for C in (1, 7, 32, 70):
        assert torch.allclose(_chunked(b, g, ld, m0, reset, C), ref, atol=1e-5), C
    if with_reset:  # a reset really cuts the past: the state right after it ignores m0 and earlier items
        bi, ti = torch.nonzero(reset)[0].tolist()
        manual = g[bi, ti, :, None] * b[bi, ti][None]
        assert torch.allclose(ref[bi, :, ti], manual, atol=1e-6)


def test_chunked_scan_gradients_match_reference():
    g0 = torch.Generator().manual_seed(1)
    b = torch.randn(2, 20, 8, generator=g0, requires_grad=True)
    g = torch.rand(2, 20, 3, generator=g0, requires_grad=True)
    ld = torch.log(torch.tensor([0.5, 0.9, 0.99])).requires_grad_()
    m0 = torch.randn(2, 3, 8, generator=g0)
    w = torch.randn(2, 3, 20, 8, generator=g0)
    grads = []
    for fn in (lambda: scan_reference(b, g, ld, m0), lambda: _chunked(b, g, ld, m0, None, 6)):
        (fn() * w).sum().backward()
        grads.append([t.grad.clone() for t in (b, g, ld)])
        for t in (b, g, ld):
            t.grad = None
    for a, c in zip(*grads):
        assert torch.allclose(a, c, atol=1e-4)


CONFIGS = [
    dict(binding="elementwise", key_source="content", gate_mode="parallel"),
    dict(binding="circular", key_source="content", gate_mode="parallel"),
    dict(binding="elementwise", key_source="position", gate_mode="parallel"),
    dict(binding="circular", key_source="position", gate_mode="recurrent"),
    dict(binding="elementwise", key_source="content", gate_mode="recurrent"),
    dict(binding="circular", key_source="mix", gate_mode="parallel"),
    dict(binding="elementwise", key_source="content", gate_mode="recurrent", mem_expand=2),
]


def test_mix_keys_are_half_content_half_position():
    from memlm.models.hamt import binding as hb
    from memlm.models.hamt.memory import HolographicMemory

    torch.manual_seed(0)
    mem = HolographicMemory(16, n_slots=2, key_source="mix")
    z, pre = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    keys = mem.write_keys(z, 7, pre)
    assert torch.equal(keys[..., :8], mem._key_fn(pre)[..., :8])
    assert torch.equal(keys[..., 8:], hb.positional_keys(torch.arange(7, 12), 16, "elementwise", 0)[None, :, 8:].expand(2, -1, -1))
    assert not torch.equal(mem.write_keys(z, 7, pre + 1.0)[..., :8], keys[..., :8])  # the content half follows the input


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda k: "-".join(map(str, k.values())))
def test_streaming_in_pieces_equals_one_pass_and_eval_is_deterministic(kw):
    torch.manual_seed(0)
    model = HAMTModel(HAMTConfig(vocab_size=40, n_layer=2, n_embd=32, n_slots=4, scan_chunk=8, **kw)).eval()
    x = torch.randint(0, 40, (2, 37))
    with torch.no_grad():
        full = model(x).logits
        again = model(x).logits
        st, outs = None, []
        for a, b in ((0, 11), (11, 12), (12, 37)):  # arbitrary pieces, one of a single token
            o = model(x[:, a:b], st)
            st, outs = o.state, outs + [o.logits]
    assert torch.equal(full, again)  # same input -> same output (keys are not redrawn)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
    assert int(st["pos"]) == 37


def test_state_is_constant_size_and_carries_information():
    torch.manual_seed(0)
    model = HAMTModel(HAMTConfig(vocab_size=30, n_layer=2, n_embd=16, n_slots=4)).eval()
    with torch.no_grad():
        s1 = model(torch.randint(0, 30, (1, 10))).state
        s2 = model(torch.randint(0, 30, (1, 500))).state
        sizes = [[t.numel() for t in (l["M"], l["conv"])] for l in s1["layers"]]
        assert sizes == [[t.numel() for t in (l["M"], l["conv"])] for l in s2["layers"]]
        # the state changes what comes next
        probe = torch.randint(0, 30, (1, 5))
        assert not torch.allclose(model(probe, s1).logits, model(probe, s2).logits)


def test_document_separator_resets_memory():
    torch.manual_seed(0)
    cfg = HAMTConfig(vocab_size=30, n_layer=1, n_embd=16, n_slots=4, reset_token_id=0)
    model = HAMTModel(cfg).eval()
    a = torch.randint(1, 30, (1, 20))
    b = torch.randint(1, 30, (1, 20))
    doc = torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.randint(1, 30, (1, 9))], 1)
    with torch.no_grad():
        la = model(torch.cat([a, doc], 1)).logits[:, -10:]
        lb = model(torch.cat([b, doc], 1)).logits[:, -10:]
    # from the separator on, nothing of the previous document is visible (memory and conv taps)
    assert (la - lb).abs().max() < 1e-4
    with torch.no_grad():  # without a separator the past does matter
        na = model(torch.cat([a, doc[:, 1:]], 1)).logits[:, -9:]
        nb = model(torch.cat([b, doc[:, 1:]], 1)).logits[:, -9:]
    assert (na - nb).abs().max() > 1e-2


def _forward_capturing(model, ids):
    """Forward pass that also returns, per layer, each token's reconstruction unbound from the
    memory with its own write key, and the item that token wrote ([B, T, D] each)."""
    recs, items, hooks = [], [], []
    for blk in model.blocks:
        mem, dim = blk.mem, blk.mem.dim
        for name in ("_reconstruct", "_reconstruct_fused"):  # the materialised and the fused path
            def capture(*args, _reconstruct=getattr(mem, name), **kw):
                recs.append(_reconstruct(*args, **kw))
                return recs[-1]

            setattr(mem, name, capture)
        hooks.append(mem.w_zin.register_forward_hook(lambda m, i, o, d=dim: items.append(o[..., d : 2 * d].detach())))
    try:
        out = model(ids)
    finally:
        for blk, h in zip(model.blocks, hooks):
            del blk.mem._reconstruct, blk.mem._reconstruct_fused
            h.remove()
    return out, recs, items


def _cosines(recs, items):
    """Per layer: cos(reconstruction, own item) and cos(reconstruction, the item another row wrote)."""
    cos = F.cosine_similarity
    return ([cos(r.detach().float(), i.float(), dim=-1) for r, i in zip(recs, items)],
            [cos(r.detach().float(), i.roll(1, dims=0).float(), dim=-1) for r, i in zip(recs, items)])


def test_aux_reconstruction_loss_and_metrics():
    torch.manual_seed(0)
    model = HAMTModel(HAMTConfig(vocab_size=30, n_layer=2, n_embd=16, aux_weight=0.5)).train()
    out, recs, items = _forward_capturing(model, torch.randint(0, 30, (2, 24)))
    assert set(out.aux_losses) == {"recon"}
    assert torch.isclose(out.aux_losses["recon"], 0.5 * out.metrics["recon_mse"])
    assert -1.0 <= float(out.metrics["fidelity"]) <= 1.0
    # the fidelity metric is the mean cosine between what the memory gives back and what was stored,
    # and that is clearly above the cosine with an item of another, unrelated sequence
    own, other = _cosines(recs, items)
    assert float(out.metrics["fidelity"]) == pytest.approx(float(torch.stack([c.mean() for c in own]).mean()), abs=1e-5)
    for c_own, c_other in zip(own, other):
        assert c_own.mean() > c_other.mean() + 0.2, (c_own.mean(), c_other.mean())
    out.aux_losses["recon"].backward()
    key_rows = model.blocks[0].mem.w_zin.weight.grad[32:]  # item and key projections get the aux gradient
    assert key_rows.abs().sum() > 0
    model.eval()
    assert model(torch.randint(0, 30, (2, 24))).aux_losses == {}



@pytest.mark.parametrize("kw", [dict(binding="elementwise", key_source="position"),
                                dict(binding="circular", key_source="content")], ids=["bipolar", "unitary"])
def test_exact_keys_give_back_the_first_item_and_crosstalk_lowers_fidelity(kw):
    """Bipolar (k*k = 1) and unitary keys invert exactly: the first token, alone in the memory,
    is reconstructed perfectly; later ones share the slots with earlier bindings and come back
    noisier, but still far closer to their own item than to an unrelated one."""
    torch.manual_seed(0)
    model = HAMTModel(HAMTConfig(vocab_size=30, n_layer=2, n_embd=16, aux_weight=0.5, **kw)).train()
    out, recs, items = _forward_capturing(model, torch.randint(0, 30, (2, 24)))
    own, other = _cosines(recs, items)
    for c_own, c_other in zip(own, other):
        assert c_own[:, 0].min() > 0.999
        assert c_own[:, 1:].mean() < 0.9  # superposition costs fidelity
        assert c_own.mean() > c_other.mean() + 0.2
    assert float(out.metrics["fidelity"]) == pytest.approx(float(torch.stack([c.mean() for c in own]).mean()), abs=1e-5)

def test_memory_state_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = HAMTModel(HAMTConfig(vocab_size=30, n_layer=2, n_embd=32, tau_max=16384.0)).eval()
    x = torch.randint(0, 30, (2, 40))
    with torch.no_grad():
        ref = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert all(layer["M"].dtype == torch.float32 for layer in out.state["layers"])
    assert torch.isfinite(out.logits.float()).all()
    assert (out.logits.float() - ref).abs().max() < 0.1


def test_mem_expand_widens_the_slots_and_keeps_the_state_constant_in_length():
    torch.manual_seed(0)
    model = HAMTModel(HAMTConfig(vocab_size=30, n_layer=2, n_embd=16, n_slots=4, mem_expand=4)).eval()
    with torch.no_grad():
        short, long = model(torch.randint(0, 30, (2, 9))).state, model(torch.randint(0, 30, (2, 300))).state
    assert short["layers"][0]["M"].shape == long["layers"][0]["M"].shape == (2, 4, 64)
    assert model.init_state(2)["layers"][1]["M"].shape == (2, 4, 64)
    base = HAMTModel(HAMTConfig(vocab_size=30, n_layer=2, n_embd=16, n_slots=4))
    assert model.param_count() > base.param_count()  # wider item/key/probe projections
