"""MetaController: exact log-probs/entropies, schedules, greedy, bias vector, PPO clipping, learning, reward."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical

from memlm.models.hmst.controller import (
    GATES,
    GateDecision,
    MetaController,
    calibration_score,
    compute_reward,
    ppo_loss,
)
from memlm.core.errors import MemLMError

D, E = 16, 4


def make_inputs(b=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g), torch.rand(b, 4, generator=g)


def controller(seed=0, **kw):
    torch.manual_seed(seed)
    ctl = MetaController(D, E, **kw)
    with torch.no_grad():  # make the policy depend on the input so the test is not trivial
        for head in (ctl.gate_head, ctl.expert_head):
            head.weight.normal_(0, 1.0)
    return ctl


def manual_log_prob_and_entropy(dec: GateDecision):
    lp = torch.zeros_like(dec.log_prob)
    ent = torch.zeros_like(dec.entropy)
    for g in GATES:
        dist = Bernoulli(probs=dec.probs[g])
        lp = lp + dist.log_prob(getattr(dec, g))
        ent = ent + dist.entropy()
    cat = Categorical(probs=dec.probs["expert"])
    return lp + cat.log_prob(dec.expert_choice), ent + cat.entropy()


@pytest.mark.parametrize("mode", ["sample", "greedy", "schedule"])
def test_log_prob_and_entropy_equal_independent_distribution_sums(mode):
    ctl = controller()
    pooled, feats = make_inputs()
    dec = ctl(pooled, feats, mode=mode, schedule={"exit": 0.3}, generator=torch.Generator().manual_seed(1))
    lp, ent = manual_log_prob_and_entropy(dec)
    assert torch.allclose(dec.log_prob, lp, atol=1e-5)
    assert torch.allclose(dec.entropy, ent, atol=1e-5)
    assert dec.log_prob.requires_grad and dec.value.shape == (32,)
    # re-scoring the stored actions gives the same numbers (PPO ratio == 1 before any update)
    lp2, ent2, val2 = ctl.log_prob_of(pooled, feats, dec.actions())
    assert torch.allclose(lp2, dec.log_prob) and torch.allclose(ent2, dec.entropy) and torch.allclose(val2, dec.value)
    # and the expert choice can be recovered from the bias vector alone
    acts = {g: getattr(dec, g) for g in GATES}
    acts["expert_bias"] = dec.expert_bias
    assert torch.allclose(ctl.log_prob_of(pooled, feats, acts)[0], dec.log_prob)
    assert torch.allclose(ctl.log_prob_of(pooled, feats, dec)[0], dec.log_prob)


def test_schedule_frequencies_match_schedule():
    ctl = controller()
    pooled, feats = make_inputs(b=20000)
    sched = {"exit": 0.1, "episodic": 1.0, "semantic": 0.0, "verify": 0.5, "expert_bias": 0.3}
    dec = ctl(pooled, feats, mode="schedule", schedule=sched, generator=torch.Generator().manual_seed(0))
    tol = 4 * math.sqrt(0.25 / 20000)
    assert abs(dec.exit.mean().item() - 0.1) < tol
    assert dec.episodic.min().item() == 1.0 and dec.semantic.max().item() == 0.0
    assert abs(dec.verify.mean().item() - 0.5) < tol
    biased = dec.expert_choice < E
    assert abs(biased.float().mean().item() - 0.3) < tol
    counts = torch.bincount(dec.expert_choice[biased], minlength=E).float() / biased.sum()
    assert (counts - 1 / E).abs().max() < 0.03  # the preferred expert is uniform
    rnd = ctl(pooled, feats, mode="schedule", schedule="random", generator=torch.Generator().manual_seed(1))
    assert all(abs(getattr(rnd, g).mean().item() - 0.5) < tol for g in GATES)
    always = ctl(pooled[:50], feats[:50], mode="schedule", schedule="always")
    assert always.gates().min() == 1 and (always.expert_choice < E).all()


def test_sample_frequencies_follow_policy_and_greedy_thresholds():
    ctl = MetaController(D, E, init_gate_probs={"exit": 0.2, "verify": 0.9}, init_no_bias_prob=0.7)
    pooled, feats = make_inputs(b=20000)
    dec = ctl(pooled, feats, mode="sample", generator=torch.Generator().manual_seed(3))
    assert abs(dec.exit.mean().item() - dec.probs["exit"].mean().item()) < 0.015
    assert abs(dec.exit.mean().item() - 0.2) < 0.03 and abs(dec.verify.mean().item() - 0.9) < 0.03
    assert abs((dec.expert_choice == E).float().mean().item() - 0.7) < 0.03
    greedy = ctl(pooled[:100], feats[:100], mode="greedy")
    assert torch.equal(greedy.exit, (greedy.probs["exit"] > 0.5).float())
    assert torch.equal(greedy.expert_choice, greedy.probs["expert"].argmax(-1))
    a = ctl(pooled[:64], feats[:64], generator=torch.Generator().manual_seed(5))
    b = ctl(pooled[:64], feats[:64], generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.gates(), b.gates()) and torch.equal(a.expert_choice, b.expert_choice)


def test_expert_bias_vector():
    ctl = controller(bias_scale=2.5)
    pooled, feats = make_inputs(b=200)
    dec = ctl(pooled, feats, generator=torch.Generator().manual_seed(0))
    for row, choice in zip(dec.expert_bias, dec.expert_choice.tolist()):
        expected = torch.zeros(E)
        if choice < E:
            expected[choice] = 2.5
        assert torch.equal(row, expected)
    assert (dec.expert_choice == E).any() and (dec.expert_choice < E).any()


def test_state_features_are_normalised():
    ctl = MetaController(D, E, vocab_size=100, max_context=1000)
    f = ctl.state_features(
        torch.tensor([0.0, math.log(100), 50.0]), torch.tensor([0, 1000, 10**6]), torch.tensor([0.0, 0.5, 3.0]),
        torch.tensor([float("nan"), 0.3, -2.0]),
    )
    assert f.shape == (3, 4)
    assert torch.allclose(f[:, 0], torch.tensor([0.0, 1.0, 1.0]))
    assert torch.allclose(f[:, 1], torch.tensor([0.0, 1.0, 1.0]))
    assert torch.allclose(f[:, 2], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(f[:, 3], torch.tensor([0.0, 0.3, -1.0]))
    g = ctl.state_features(torch.tensor([1.0, 2.0]), 10, 0.25, 0.9)  # scalars broadcast
    assert g.shape == (2, 4) and torch.allclose(g[:, 2], torch.tensor([0.25, 0.25]))


def test_ppo_clipping_zeroes_gradient_in_the_clipped_direction():
    old = torch.zeros(4)
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +, -, +, -
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats = ppo_loss(new, old, adv, torch.zeros(4), torch.zeros(4), clip=0.2, vf_coef=0.0)
    loss.backward()
    grad = new.grad
    assert grad[0] == 0 and grad[3] == 0  # clipped: no push beyond the trust region
    assert grad[1] != 0 and grad[2] != 0  # unclipped side still moves
    # the objective value itself: -mean(min(r A, clip(r) A)) with normalised A = A here
    expected = -torch.tensor([1.2, -1.5, 0.5, -0.8]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert stats["clip_frac"].item() == 1.0


def test_ppo_value_and_entropy_terms_and_advantage_normalisation():
    new = torch.zeros(3, requires_grad=True)
    values = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    returns = torch.tensor([1.0, 1.0, 1.0])
    entropy = torch.tensor([0.5, 0.5, 0.5])
    loss, stats = ppo_loss(new, torch.zeros(3), torch.tensor([10.0, 20.0, 30.0]), values, returns,
                           vf_coef=0.5, ent_coef=0.1, entropy=entropy)
    # normalised advantages have mean 0, so the policy term is 0 at ratio 1
    assert abs(stats["policy_loss"].item()) < 1e-6
    assert torch.allclose(loss, torch.tensor(0.5 * (2 / 3) - 0.1 * 0.5))
    loss.backward()
    assert torch.allclose(values.grad, 0.5 * 2 * (values.detach() - returns) / 3)


def test_ppo_learns_a_gate_bandit():
    """Reward 1 when verify is on and semantic is off: PPO must raise P(verify) and lower P(semantic)."""
    torch.manual_seed(0)
    ctl = MetaController(D, E, hidden=32)
    opt = torch.optim.Adam(ctl.parameters(), lr=3e-3)
    pooled, feats = make_inputs(b=256)
    gen = torch.Generator().manual_seed(0)
    before = ctl(pooled, feats)
    for _ in range(15):
        with torch.no_grad():
            dec = ctl(pooled, feats, generator=gen)
            reward = dec.verify * (1 - dec.semantic)
            old_lp, adv = dec.log_prob, reward - dec.value
        for _ in range(4):
            lp, ent, val = ctl.log_prob_of(pooled, feats, dec.actions())
            loss, _ = ppo_loss(lp, old_lp, adv, val, reward, entropy=ent)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = ctl(pooled, feats)
    assert after.probs["verify"].mean() > before.probs["verify"].mean() + 0.3
    assert after.probs["semantic"].mean() < before.probs["semantic"].mean() - 0.3


def test_reward_and_errors():
    r = compute_reward(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 1.0]), torch.tensor([0.1, 0.2]),
                       torch.tensor([0.9, 0.1]), 0.2, 1.0, 0.5)
    assert torch.allclose(r, torch.tensor([1.0 - 0.1 - 0.1 + 0.45, 0.5 - 0.2 - 0.2 + 0.05]))
    assert compute_reward(1.0, 0.0, 0.0, 0.0, 1, 1, 1) == 1.0
    assert torch.allclose(calibration_score(torch.tensor([0.9, 0.9]), torch.tensor([1.0, 0.0])), torch.tensor([0.99, 0.19]))
    ctl = MetaController(D, E)
    pooled, feats = make_inputs(b=2)
    with pytest.raises(MemLMError):
        ctl(pooled, feats, mode="explore")
    with pytest.raises(MemLMError):
        ctl(pooled, feats, mode="schedule", schedule={"exitt": 1.0})
    with pytest.raises(MemLMError):
        ctl(pooled[:, :3], feats)
