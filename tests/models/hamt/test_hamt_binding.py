"""Binding/unbinding inverse properties and the fixed positional keys."""
import torch

from memlm.models.hamt import binding as hb


def test_bipolar_single_item_is_recovered_exactly():
    g = torch.Generator().manual_seed(0)
    item = torch.randn(5, 256, generator=g)
    key = hb.bipolar_keys(torch.arange(5), 256, seed=3)
    assert set(key.unique().tolist()) == {-1.0, 1.0}
    back = hb.unbind_elementwise(hb.bind_elementwise(item, key), key)
    assert torch.equal(back, item)


def test_bipolar_superposition_recovers_item_with_crosstalk():
    g = torch.Generator().manual_seed(1)
    items = torch.randn(4, 512, generator=g)
    keys = hb.bipolar_keys(torch.arange(4), 512)
    memory = hb.bind_elementwise(items, keys).sum(0)
    rec = hb.unbind_elementwise(memory, keys[2])
    sims = torch.nn.functional.cosine_similarity(rec[None], items, dim=-1)
    assert sims.argmax() == 2 and sims[2] > 0.35  # 1/sqrt(4) expected signal, others ~ 1/sqrt(D)


def test_circular_unbinding_error_shrinks_with_dimension():
    """Random Gaussian keys: unbinding is approximate. The reconstruction keeps cosine ~1/sqrt(2) with
    its item at any D (the key's autocorrelation sidelobes), while the crosstalk against other items
    falls like 1/sqrt(D), so the retrieval error (nearest item in a codebook) shrinks as D grows."""
    crosstalk, wrong = [], []
    for dim in (32, 128, 512, 2048):
        n_items, n_stored = 64, 6
        codebook = hb.gaussian_keys(torch.arange(n_items) + 5000, dim, seed=9)
        keys = hb.gaussian_keys(torch.arange(n_stored), dim, seed=5)
        trials_wrong, trials_x = 0, []
        for trial in range(8):
            idx = torch.arange(n_stored) * 7 + trial
            memory = hb.circular_conv(codebook[idx], keys).sum(0)
            rec = hb.circular_corr(memory.expand(n_stored, -1), keys)
            sims = torch.nn.functional.cosine_similarity(rec[:, None], codebook[None], dim=-1)  # [stored, items]
            trials_wrong += int((sims.argmax(-1) != idx).sum())
            mask = torch.ones_like(sims, dtype=torch.bool)
            mask[torch.arange(n_stored), idx] = False
            trials_x.append(sims[mask].std())
        crosstalk.append(float(torch.stack(trials_x).mean()))
        wrong.append(trials_wrong / (8 * n_stored))
    assert all(a > b for a, b in zip(crosstalk, crosstalk[1:])), crosstalk
    assert crosstalk[0] / crosstalk[-1] > 5  # ~ sqrt(2048 / 32) = 8
    assert wrong[0] > wrong[-1] and wrong[-1] == 0.0, wrong
    # a single item: approximate, not exact
    item, key = codebook[0], keys[0]
    rec = hb.circular_corr(hb.circular_conv(item, key), key)
    cos = float(torch.nn.functional.cosine_similarity(rec, item, dim=0))
    assert 0.5 < cos < 0.999


def test_circular_with_unitary_key_is_exact():
    g = torch.Generator().manual_seed(2)
    item = torch.randn(3, 128, generator=g)
    key = hb.unitary(torch.randn(3, 128, generator=g))
    assert torch.allclose(key.norm(dim=-1), torch.ones(3), atol=1e-4)
    back = hb.circular_corr(hb.circular_conv(item, key), key)
    assert torch.allclose(back, item, atol=1e-4)


def test_circular_conv_matches_definition():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    direct = torch.stack([sum(a[j] * b[(k - j) % 16] for j in range(16)) for k in range(16)])
    assert torch.allclose(hb.circular_conv(a, b), direct, atol=1e-5)


def test_positional_keys_are_fixed_functions_of_position():
    pos = torch.tensor([0, 1, 2, 70000, 2**33])
    for method in ("elementwise", "circular"):
        a = hb.positional_keys(pos, 64, method, seed=1)
        b = hb.positional_keys(pos.clone(), 64, method, seed=1)
        assert torch.equal(a, b)
        # the same position gives the same key wherever it appears in a batch
        assert torch.equal(hb.positional_keys(torch.tensor([70000]), 64, method, 1)[0], a[3])
        c = hb.positional_keys(pos, 64, method, seed=2)
        assert not torch.equal(a, c)
    # bipolar keys of different positions are nearly orthogonal and balanced
    k = hb.bipolar_keys(torch.arange(200), 1024)
    gram = (k @ k.T) / 1024
    off = gram[~torch.eye(200, dtype=torch.bool)]
    assert off.abs().max() < 0.2 and k.mean().abs() < 0.02
    gk = hb.gaussian_keys(torch.arange(200), 1024)
    assert abs(float(gk.norm(dim=-1).mean()) - 1.0) < 0.05


def _fft_recall_accuracy(dim: int, pairs: int, n_values: int, trials: int, unitary_keys: bool, seed: int) -> float:
    """Toy associative recall through FFT binding: store ``pairs`` (key, value) bindings in one
    superposed vector per trial, unbind with each key, decode the nearest of ``n_values`` codebook
    values. Returns the fraction of queries decoded to the stored value (chance: 1/n_values)."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.nn.functional.normalize(torch.randn(n_values, dim, generator=g), dim=-1)
    value_ids = torch.randint(0, n_values, (trials, pairs), generator=g)
    keys = torch.randn(trials, pairs, dim, generator=g) / dim**0.5
    if unitary_keys:
        keys = hb.unitary(keys)
    memory = hb.circular_conv(codebook[value_ids], keys).sum(1)  # [trials, dim]: every pair superposed
    recalled = hb.circular_corr(memory[:, None, :], keys)  # [trials, pairs, dim]
    decoded = (recalled @ codebook.T).argmax(-1)
    return float((decoded == value_ids).float().mean())


def test_fft_binding_recalls_stored_values_far_above_chance_and_degrades_with_load():
    chance = 1 / 64
    for unitary_keys in (False, True):  # Gaussian keys (approximate inverse) and unitary keys (exact inverse)
        light = _fft_recall_accuracy(256, 8, 64, trials=32, unitary_keys=unitary_keys, seed=0)
        heavy = _fft_recall_accuracy(256, 128, 64, trials=32, unitary_keys=unitary_keys, seed=0)
        assert light > 0.9 > 20 * chance  # 8 pairs in 256 dims: nearly every query is answered
        assert chance * 2 < heavy < light  # 128 pairs: crosstalk grows as sqrt(pairs/D), still above chance


def test_fft_binding_recall_through_the_memory_scan_and_unitary_content_keys():
    """The same toy task through HolographicMemory's own pieces: its unitary key function, the
    chunked write scan (gate 1, no decay), and its per-slot unbinding read."""
    from memlm.models.hamt.memory import HolographicMemory, scan_chunk

    mem = HolographicMemory(128, n_slots=1, binding="circular")
    g = torch.Generator().manual_seed(3)
    B, pairs, n_values = 16, 6, 32
    codebook = torch.nn.functional.normalize(torch.randn(n_values, 128, generator=g), dim=-1)
    value_ids = torch.randint(0, n_values, (B, pairs), generator=g)
    keys = mem._key_fn(torch.randn(B, pairs, 128, generator=g))
    b = hb.bind(codebook[value_ids], keys, "circular")
    m_all = scan_chunk(b, torch.ones(B, pairs, 1), torch.zeros(1), torch.zeros(B, 1, 128))  # [B, 1, pairs, D]
    final = m_all[:, :, -1:].expand(-1, -1, pairs, -1)  # the memory after all writes, read at every key
    recalled = mem._unbind(final, keys)[:, 0]  # [B, pairs, D]
    acc = float(((recalled @ codebook.T).argmax(-1) == value_ids).float().mean())
    assert acc > 0.9 and acc > 20 / n_values
