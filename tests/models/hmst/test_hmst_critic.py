"""Critic: padding invariance, segment awareness, truncation, loss definition, learns a separable task."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memlm.models.hmst.critic import Critic

V, PAD = 40, 0


def batch(b, seed):
    """label 1 iff the response's tokens come from the upper half of the vocabulary (separable)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(1, V, (b, 6), generator=g)
    f = torch.randint(1, V, (b, 7), generator=g)
    label = torch.rand(b, generator=g) < 0.5
    r = torch.randint(1, V // 2, (b, 5), generator=g) + label.long().unsqueeze(1) * (V // 2 - 1)
    # random right padding of every part
    for part, keep in ((q, 3), (r, 2), (f, 2)):
        lengths = torch.randint(keep, part.shape[1] + 1, (b,), generator=g)
        part[torch.arange(part.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)] = PAD
    return q, r, f, label.float()


def test_padding_is_invisible_and_segments_matter():
    torch.manual_seed(0)
    critic = Critic(V, d_model=32, n_layers=2, n_heads=4, max_len=64).eval()
    q, r, f, _ = batch(8, 0)
    base = critic(q, r, f).logits
    padded = critic(F.pad(q, (0, 5), value=PAD), F.pad(r, (0, 3), value=PAD), F.pad(f, (0, 9), value=PAD)).logits
    assert torch.allclose(base, padded, atol=1e-5)
    swapped = critic(r, q, f).logits  # same tokens, different segments
    assert (swapped - base).abs().max() > 1e-4
    out = critic(q, r, f)
    assert ((out.p_correct > 0) & (out.p_correct < 1)).all() and ((out.confidence >= 0) & (out.confidence <= 1)).all()
    assert torch.allclose(out.p_correct, torch.sigmoid(out.logits))
    assert torch.allclose(out.confidence, torch.sigmoid(out.confidence_logits))
    # the verdict reads the facts: other facts, other scores, for every example
    _, _, other_facts, _ = batch(8, 1)
    assert ((critic(q, r, other_facts).logits - base).abs() > 1e-4).all()
    # and each example is scored on its own: the rest of the batch changes nothing
    for i in (0, 5):
        alone = critic(q[i : i + 1], r[i : i + 1], f[i : i + 1]).logits
        assert torch.allclose(alone, base[i : i + 1], atol=1e-5)


def test_long_inputs_are_truncated_to_max_len():
    critic = Critic(V, d_model=16, n_layers=1, n_heads=2, max_len=24)
    q, r, f = torch.randint(1, V, (2, 10)), torch.randint(1, V, (2, 10)), torch.randint(1, V, (2, 30))
    out = critic(q, r, f)
    assert out.logits.shape == (2,) and torch.isfinite(out.logits).all()
    # the facts beyond the budget are cut: changing them does not change the output
    f2 = f.clone()
    f2[:, 5:] = 1
    critic.eval()
    assert torch.allclose(critic(q, r, f).logits, critic(q, r, f2).logits)


def test_loss_is_bce_plus_confidence_term():
    critic = Critic(V, d_model=16, n_layers=1, n_heads=2, conf_weight=0.0)
    q, r, f, y = batch(6, 1)
    out = critic(q, r, f)
    assert torch.allclose(critic.loss(out, y), F.binary_cross_entropy_with_logits(out.logits, y))
    critic.conf_weight = 0.5
    right = ((out.logits > 0).float() == y).float()
    expected = F.binary_cross_entropy_with_logits(out.logits, y) + 0.5 * F.binary_cross_entropy_with_logits(
        out.confidence_logits, right
    )
    assert torch.allclose(critic.loss(out, y), expected)


def test_critic_learns_a_separable_task():
    torch.manual_seed(0)
    critic = Critic(V, d_model=32, n_layers=1, n_heads=4, max_len=32)
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        q, r, f, y = batch(32, 100 + step)
        out = critic(q, r, f)
        loss = F.binary_cross_entropy_with_logits(out.logits, y)
        total = critic.loss(out, y)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    critic.eval()
    q, r, f, y = batch(512, 9999)
    with torch.no_grad():
        out = critic(q, r, f)
    acc = ((out.p_correct > 0.5).float() == y).float().mean().item()
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, losses
    assert acc > 0.9, acc
    right = (out.p_correct > 0.5).float() == y
    assert out.confidence[right].mean() > 0.7  # the confidence head learned that its verdicts are mostly right


def test_match_flags_mark_the_ngrams_found_in_the_other_parts():
    critic = Critic(V, d_model=16, n_layers=1, n_heads=2, max_len=64, match_ngram=2).eval()
    # query 5 6 7 | response 7 8 | facts 1 5 6 9 7 8 2, right-padded
    q = torch.tensor([[5, 6, 7, PAD]])
    r = torch.tensor([[7, 8]])
    f = torch.tensor([[1, 5, 6, 9, 7, 8, 2, PAD, PAD]])
    valid = torch.cat([torch.ones(1, 1), q != PAD, torch.ones(1, 1), r != PAD, torch.ones(1, 1), f != PAD], 1).bool()
    flags = critic._match_flags(q, r, f, valid, q.size(1), r.size(1))[0].tolist()
    # [CLS] q..., [SEP] r..., [SEP] f...: bit 0 = in the first other part, bit 1 = in the second
    # query (response, facts): bigram 5 6 is in the facts, 6 7 nowhere, so 7 only by itself is not
    assert flags[0:5] == [0, 2, 2, 0, 0]
    # response (query, facts): 7 8 is in the facts, not in the query
    assert flags[5:8] == [0, 2, 2]
    # facts (response, query): 5 6 from the query, 7 8 from the response, padding 0
    assert flags[8:] == [0, 0, 2, 2, 0, 1, 1, 0, 0, 0]
    # a token id and its padding twin never match: pad positions carry no flag
    with torch.no_grad():
        base = critic(q, r, f).logits
        padded = critic(F.pad(q, (0, 3), value=PAD), r, F.pad(f, (0, 2), value=PAD)).logits
    assert torch.allclose(base, padded, atol=1e-5)
    # a part cut to nothing by max_len (the stage-1 critic rows can be) still scores
    tight = Critic(V, d_model=16, n_layers=1, n_heads=2, max_len=9, match_ngram=2).eval()
    with torch.no_grad():
        assert torch.isfinite(tight(q, r, f).logits).all()


def test_match_flags_let_a_small_critic_check_a_copied_claim():
    """label 1 iff the response occurs in the facts: random tokens, so only matching can tell.
    With the flags a one-layer critic learns it in 150 steps; without them it stays near chance."""
    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        f = torch.randint(1, V, (n, 12), generator=g)
        label = torch.rand(n, generator=g) < 0.5
        start = torch.randint(0, 9, (n,), generator=g)
        copied = torch.stack([f[i, s:s + 3] for i, s in enumerate(start.tolist())])
        r = torch.where(label.unsqueeze(1), copied, torch.randint(1, V, (n, 3), generator=g))
        return torch.randint(1, V, (n, 4), generator=g), r, f, label.float()

    def accuracy(ngram):
        torch.manual_seed(0)
        critic = Critic(V, d_model=32, n_layers=1, n_heads=4, max_len=32, match_ngram=ngram)
        opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
        for step in range(150):
            q, r, f, y = data(64, step)
            loss = critic.loss(critic(q, r, f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        q, r, f, y = data(512, 10_000)
        with torch.no_grad():
            return ((critic(q, r, f).p_correct > 0.5).float() == y).float().mean().item()

    assert accuracy(2) > 0.9
    assert accuracy(0) < 0.75
