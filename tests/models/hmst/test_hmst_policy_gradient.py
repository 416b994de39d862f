"""Stage-3 policy gradients: PPO/REINFORCE losses, GAE/MC returns and the reward against hand-computed
values, on-policy freshness, and that an update learns."""
from __future__ import annotations

import math

import pytest
import torch

from memlm.core.errors import MemLMError
from memlm.models.hmst.controller import MetaController, ppo_loss
from memlm.models.hmst.policy_gradient import (
    RewardConfig,
    RLConfig,
    gae_advantages,
    monte_carlo_returns,
    reinforce_loss,
    start_rollout,
    update_policy,
)

D, E = 16, 4


def test_ppo_loss_matches_hand_computation():
    # ratios 1.5, 0.5, 1 with advantages 1, -1, 2 (no normalisation): min(rA, clip(r)A) = 1.2, -0.8, 2
    new = torch.log(torch.tensor([1.5, 0.5, 1.0]))
    loss, stats = ppo_loss(new, torch.zeros(3), torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]),
                           torch.ones(3), clip=0.2, vf_coef=0.5, ent_coef=0.1, entropy=torch.tensor([1.0, 2.0, 3.0]),
                           normalize_advantages=False)
    policy = -(1.2 - 0.8 + 2.0) / 3
    value = (1 + 0 + 1) / 3
    assert stats["policy_loss"].item() == pytest.approx(policy, abs=1e-6)
    assert stats["value_loss"].item() == pytest.approx(value, abs=1e-6)
    assert loss.item() == pytest.approx(policy + 0.5 * value - 0.1 * 2.0, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    # KL estimator (r - 1) - log r
    kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5)) + 0) / 3
    assert stats["approx_kl"].item() == pytest.approx(kl, abs=1e-6)


def test_reinforce_loss_matches_hand_computation():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    values = torch.tensor([0.5, 0.5])
    returns = torch.tensor([1.5, 0.0])
    loss, stats = reinforce_loss(lp, returns, values, torch.tensor([0.4, 0.6]), vf_coef=0.5, ent_coef=0.1,
                                 normalize_advantages=False)
    # advantages 1.0, -0.5: -mean(lp*A) = -((-1)(1) + (-2)(-0.5))/2 = 0
    assert stats["policy_loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.25) / 2 - 0.1 * 0.5, abs=1e-6)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([-0.5, 0.25]))  # -A/N


def test_gae_and_monte_carlo_returns_by_hand():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [1.0], [0.0]])
    g, lam = 0.9, 0.5
    d2 = 2.0 - 0.0
    d1 = 0.0 + g * 0.0 - 1.0
    d0 = 1.0 + g * 1.0 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae_advantages(r, v, None, g, lam)
    assert torch.allclose(adv[:, 0], torch.tensor([a0, a1, a2]))
    assert torch.allclose(ret, adv + v)
    mc = monte_carlo_returns(r, g)
    assert torch.allclose(mc[:, 0], torch.tensor([1 + g * (0 + g * 2), g * 2, 2.0]))
    # lambda = 1 GAE returns are the Monte-Carlo returns
    assert torch.allclose(gae_advantages(r, v, None, g, 1.0)[1], mc)


def test_reward_parts_use_every_coefficient():
    cfg = RewardConfig(lambda_compute=0.5, lambda_latency=2.0, lambda_calibration=0.25)
    p = cfg.parts(torch.tensor([1.0, 0.0]), torch.tensor([0.4, 1.0]), 0.1, torch.tensor([0.8, 0.2]))
    assert torch.allclose(p["compute"], torch.tensor([-0.2, -0.5]))
    assert torch.allclose(p["latency"], torch.tensor([-0.2, -0.2]))
    assert torch.allclose(p["calibration"], torch.tensor([0.2, 0.05]))
    assert torch.allclose(p["total"], torch.tensor([1.0 - 0.2 - 0.2 + 0.2, 0.0 - 0.5 - 0.2 + 0.05]))


def test_rl_config_errors():
    for bad in ({"algorithm": "a2c"}, {"returns": "td"}, {"epochs": 0}, {"gamma": 1.5}, {"clip": 0}):
        with pytest.raises(MemLMError):
            RLConfig(**bad)


def _bandit_rollout(ctl, pooled, feats, gen):
    ro = start_rollout(ctl)
    with torch.no_grad():
        dec = ctl(pooled, feats, generator=gen)
    reward = dec.verify * (1 - dec.semantic)
    ro.add(dec, pooled, feats, reward)
    return ro


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce"])
def test_update_policy_learns_and_refuses_stale_rollouts(algorithm):
    torch.manual_seed(0)
    ctl = MetaController(D, E, hidden=32)
    opt = torch.optim.Adam(ctl.parameters(), lr=3e-3 if algorithm == "ppo" else 1e-2)
    g = torch.Generator().manual_seed(0)
    pooled, feats = torch.randn(256, D, generator=g), torch.rand(256, 4, generator=g)
    cfg = RLConfig(algorithm=algorithm, epochs=4, gamma=0.0)
    before = ctl(pooled, feats)
    for _ in range(15):
        ro = _bandit_rollout(ctl, pooled, feats, g)
        stats = update_policy(ctl, opt, ro, cfg)
        # fresh rollout: the first pass re-scores the actions with the policy that took them
        assert stats["first_ratio_dev"] < 1e-5
        assert stats["grad_norm"] > 0 and stats["kl_old"] > 0
    after = ctl(pooled, feats)
    assert after.probs["verify"].mean() > before.probs["verify"].mean() + 0.2
    assert after.probs["semantic"].mean() < before.probs["semantic"].mean() - 0.2
    # the last rollout was used by an update: reusing it would train on stale log-probs
    with pytest.raises(MemLMError, match="stale rollout"):
        update_policy(ctl, opt, ro, cfg)
    with pytest.raises(MemLMError, match="empty rollout"):
        update_policy(ctl, opt, start_rollout(ctl), cfg)
