"""Stage-3 policy-gradient machinery for the HMST meta-controller: returns, losses, reward, update.

A rollout is ``T`` consecutive decisions (one per stream segment) for ``B`` rows, so the
tensors are ``[T, B]``; ``T = 1`` is the contextual bandit of one decision per segment.

- :func:`gae_advantages` / :func:`monte_carlo_returns`: GAE(gamma, lambda) or discounted
  Monte-Carlo returns over the time axis (the last step bootstraps from ``last_value``).
- :func:`reinforce_loss`: REINFORCE with the value head as baseline.
- :func:`memlm.models.hmst.controller.ppo_loss`: the clipped PPO objective.
- :class:`RewardConfig`: reward = quality - lambda_compute * compute - lambda_latency * latency
  + lambda_calibration * calibration, with every part returned for logging.
- :func:`update_policy`: several epochs (PPO) or one (REINFORCE) over a fresh rollout. A
  rollout records the controller's ``policy_version``; an update bumps it, and a rollout
  from an older version is refused, so log-probabilities are never stale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memlm.core.errors import MemLMError
from memlm.models.hmst.controller import GATES, GateDecision, MetaController, ppo_loss

ALGORITHMS = ("ppo", "reinforce")
RETURN_KINDS = ("gae", "mc")


# ---------------------------------------------------------------------- returns
def gae_advantages(rewards, values, last_value=None, gamma: float = 0.99, lam: float = 0.95):
    """(advantages, returns), both [T, B]: A_t = d_t + gamma*lam*A_{t+1}, d_t = r_t + gamma V_{t+1} - V_t."""
    rewards, values = rewards.float(), values.float().detach()
    nxt = torch.zeros_like(values[0]) if last_value is None else last_value.float().detach()
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):  # T is a handful of segments, not tokens
        delta = rewards[t] + gamma * nxt - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
        nxt = values[t]
    return adv, adv + values


def monte_carlo_returns(rewards, gamma: float = 0.99, last_value=None):
    """[T, B] discounted returns G_t = r_t + gamma G_{t+1} (G_T = last_value or 0)."""
    rewards = rewards.float()
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0]) if last_value is None else last_value.float().detach()
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def reinforce_loss(log_prob, returns, values, entropy=None, vf_coef: float = 0.5, ent_coef: float = 0.01,
                   normalize_advantages: bool = True):
    """REINFORCE with a learned baseline: -mean(log_prob * (G - V)) + vf_coef*mse(V, G) - ent_coef*mean(H)."""
    adv = (returns.detach() - values.detach()).float()
    if normalize_advantages and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
    policy_loss = -(log_prob.float() * adv).mean()
    value_loss = F.mse_loss(values.float(), returns.detach().float())
    ent = entropy.float().mean() if entropy is not None else torch.zeros((), device=policy_loss.device)
    loss = policy_loss + vf_coef * value_loss - ent_coef * ent
    stats = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "entropy": ent.detach()}
    return loss, stats


# ---------------------------------------------------------------------- reward
@dataclass(frozen=True)
class RewardConfig:
    """Coefficients of the stage-3 reward (each one a config key of the RL callback).

    ``compute`` is the metered compute of the decision as a fraction of all gates on (so
    ``lambda_compute`` means the same at every model size); ``latency`` is seconds per row.
    """

    lambda_compute: float = 0.5
    lambda_latency: float = 0.0
    lambda_calibration: float = 0.0

    def parts(self, quality, compute, latency, calibration=None) -> dict:
        """Every term of the reward, already multiplied by its coefficient, and their sum ``total``."""
        quality = torch.as_tensor(quality, dtype=torch.float32)
        parts = {
            "quality": quality,
            "compute": -self.lambda_compute * torch.as_tensor(compute, dtype=torch.float32).to(quality.device),
            "latency": -self.lambda_latency * torch.as_tensor(latency, dtype=torch.float32).to(quality.device),
            "calibration": (self.lambda_calibration * torch.as_tensor(calibration, dtype=torch.float32).to(quality.device)
                            if calibration is not None else torch.zeros_like(quality)),
        }
        parts["total"] = parts["quality"] + parts["compute"] + parts["latency"] + parts["calibration"]
        return parts


# ---------------------------------------------------------------------- algorithm config
@dataclass(frozen=True)
class RLConfig:
    algorithm: str = "ppo"
    epochs: int = 4  # PPO passes over each rollout batch (REINFORCE always makes one)
    clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    returns: str = "gae"  # or "mc"
    gamma: float = 0.0  # 0: each segment's decision is judged by its own reward (a bandit)
    gae_lambda: float = 0.95
    normalize_advantages: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise MemLMError(f"rl algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.returns not in RETURN_KINDS:
            raise MemLMError(f"rl returns must be one of {', '.join(RETURN_KINDS)}, got {self.returns!r}")
        if self.epochs < 1:
            raise MemLMError(f"rl epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise MemLMError(f"rl gamma and gae_lambda must be in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if self.clip <= 0:
            raise MemLMError(f"rl clip must be > 0, got {self.clip}")


# ---------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """Decisions of one policy version, [T, B] per tensor (pooled [T, B, D], features [T, B, F])."""

    policy_version: int
    pooled: list = field(default_factory=list)
    features: list = field(default_factory=list)
    actions: list = field(default_factory=list)  # dicts of [B] tensors
    old_log_prob: list = field(default_factory=list)
    values: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    old_gate_probs: list = field(default_factory=list)  # [B, 4]
    old_expert_probs: list = field(default_factory=list)  # [B, E+1]

    def __len__(self) -> int:
        return len(self.rewards)

    def add(self, decision: GateDecision, pooled, features, reward) -> None:
        self.pooled.append(pooled.detach())
        self.features.append(features.detach())
        self.actions.append(decision.actions())
        self.old_log_prob.append(decision.log_prob.detach())
        self.values.append(decision.value.detach())
        self.rewards.append(torch.as_tensor(reward).detach().float())
        self.old_gate_probs.append(torch.stack([decision.probs[g] for g in GATES], -1).detach())
        self.old_expert_probs.append(decision.probs["expert"].detach())


def bump_version(controller: MetaController) -> int:
    controller.policy_version = getattr(controller, "policy_version", 0) + 1
    return controller.policy_version


def start_rollout(controller: MetaController) -> Rollout:
    return Rollout(policy_version=getattr(controller, "policy_version", 0))


def exact_kl(controller: MetaController, pooled, features, old_gate_probs, old_expert_probs) -> torch.Tensor:
    """Mean KL(old || new) of the joint (independent) gate and expert distributions."""
    gate_logits, expert_logits, _ = controller._heads(pooled, features)
    p_old = old_gate_probs.clamp(1e-6, 1 - 1e-6)
    p_new = torch.sigmoid(gate_logits).clamp(1e-6, 1 - 1e-6)
    kl_gate = (p_old * (p_old / p_new).log() + (1 - p_old) * ((1 - p_old) / (1 - p_new)).log()).sum(-1)
    q_old = old_expert_probs.clamp_min(1e-8)
    kl_exp = (q_old * (q_old.log() - F.log_softmax(expert_logits, -1))).sum(-1)
    return (kl_gate + kl_exp).mean()


def update_policy(controller: MetaController, optimizer: torch.optim.Optimizer, rollout: Rollout, cfg: RLConfig,
                  max_grad_norm: float | None = 1.0, backward=None) -> dict:
    """Train ``controller`` on ``rollout`` and return the statistics to log (floats).

    Keys: policy_loss, value_loss, entropy, approx_kl, clip_frac (PPO), kl_old (exact KL of the
    updated policy to the rollout's), first_ratio_dev (max |ratio - 1| on the first pass: 0
    for a fresh rollout), grad_norm (mean over the optimizer steps, before clipping), return_mean.
    """
    version = getattr(controller, "policy_version", 0)
    if rollout.policy_version != version:
        raise MemLMError(
            f"stale rollout: collected with policy version {rollout.policy_version}, the controller is at {version}; "
            "collect a fresh rollout after each update"
        )
    if len(rollout) == 0:
        raise MemLMError("empty rollout: collect at least one decision before updating the policy")
    pooled = torch.stack(rollout.pooled)  # [T, B, D]
    feats = torch.stack(rollout.features)
    T, B = pooled.shape[:2]
    rewards = torch.stack(rollout.rewards).to(pooled.device)
    values = torch.stack(rollout.values)
    if cfg.returns == "gae":
        advantages, returns = gae_advantages(rewards, values, None, cfg.gamma, cfg.gae_lambda)
    else:
        returns = monte_carlo_returns(rewards, cfg.gamma)
        advantages = returns - values
    flat = lambda x: x.reshape(T * B, *x.shape[2:])  # noqa: E731
    pooled, feats = flat(pooled), flat(feats)
    actions = {k: torch.cat([a[k] for a in rollout.actions]) for k in rollout.actions[0]}
    old_lp = torch.cat(rollout.old_log_prob)
    adv, ret = advantages.reshape(-1), returns.reshape(-1)
    epochs = cfg.epochs if cfg.algorithm == "ppo" else 1
    params = [p for p in controller.parameters() if p.requires_grad]
    sums: dict = {}
    first_dev = 0.0
    for epoch in range(epochs):
        lp, ent, val = controller.log_prob_of(pooled, feats, actions)
        if epoch == 0:
            first_dev = float((lp.detach() - old_lp).exp().sub(1).abs().max())
        if cfg.algorithm == "ppo":
            loss, stats = ppo_loss(lp, old_lp, adv, val, ret, cfg.clip, cfg.vf_coef, cfg.ent_coef, ent,
                                   cfg.normalize_advantages)
        else:
            loss, stats = reinforce_loss(lp, ret, val, ent, cfg.vf_coef, cfg.ent_coef, cfg.normalize_advantages)
        optimizer.zero_grad()
        loss.backward() if backward is None else backward(loss)  # LightningModule.manual_backward in a Trainer
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
        optimizer.step()
        stats["grad_norm"] = norm.detach()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    out = {k: v / epochs for k, v in sums.items()}
    with torch.no_grad():
        out["kl_old"] = float(exact_kl(controller, pooled, feats, torch.cat(rollout.old_gate_probs),
                                       torch.cat(rollout.old_expert_probs)))
    out["first_ratio_dev"] = first_dev
    out["return_mean"] = float(ret.mean())
    bump_version(controller)
    return out
