"""HMST meta-controller: a small policy over five decision gates, trained by PPO.

Inputs per sequence: a pooled early-layer hidden state ``[B, d_model]`` and normalised state
features ``[B, 4]`` (exit-head entropy, context length, memory occupancy, best retrieval
similarity; see :meth:`MetaController.state_features`).

Actions (one joint action per sequence):

1. ``exit``      Bernoulli: stop after the early layers (the model skips the rest).
2. ``episodic``  Bernoulli: read the episodic (SSM) memory.
3. ``semantic``  Bernoulli: read the FAISS semantic memory.
4. ``verify``    Bernoulli: score the answer with the critic.
5. ``expert``    Categorical over ``n_experts + 1`` choices: prefer expert e (a bias of
   ``+bias_scale`` is added to that expert's router logit) or ``n_experts`` = no bias. A
   discrete choice keeps the action space small and the log-probability exact; the bias
   vector is ``expert_bias = bias_scale * one_hot(choice)[:, :n_experts]``.

``log_prob`` is the sum of the five actions' log-probabilities under the current policy and
``entropy`` the sum of the five distributions' entropies. Both are computed in every mode,
including ``"schedule"`` (stage 1, where actions come from a fixed schedule so every path is
trained, not from the policy). ``value`` is a baseline head for PPO.

Each decision is a one-step episode (a contextual bandit per segment/turn), so the PPO
advantage is ``reward - value`` (see :func:`ppo_loss`, which normalises advantages), and the
reward is :func:`compute_reward`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.core.errors import MemLMError

GATES = ("exit", "episodic", "semantic", "verify")
SCHEDULE_KEYS = GATES + ("expert_bias",)
MODES = ("sample", "greedy", "schedule")


@dataclass
class GateDecision:
    """One joint action per batch row, with its policy statistics."""

    exit: torch.Tensor  # [B] float 0/1
    episodic: torch.Tensor  # [B] float 0/1
    semantic: torch.Tensor  # [B] float 0/1
    verify: torch.Tensor  # [B] float 0/1
    expert_choice: torch.Tensor  # [B] long in [0, n_experts]; n_experts = no bias
    expert_bias: torch.Tensor  # [B, n_experts], added to router logits
    log_prob: torch.Tensor  # [B] sum of the 5 actions' log-probs under the policy
    entropy: torch.Tensor  # [B] sum of the 5 distributions' entropies
    value: torch.Tensor  # [B] PPO baseline
    probs: dict = field(default_factory=dict)  # gate -> [B] P(on); "expert" -> [B, n_experts+1]

    def gates(self) -> torch.Tensor:
        """[B, 4] float: exit, episodic, semantic, verify."""
        return torch.stack([self.exit, self.episodic, self.semantic, self.verify], dim=-1)

    def actions(self) -> dict:
        """Detached actions to store in a rollout and re-score with :meth:`MetaController.log_prob_of`."""
        out = {g: getattr(self, g).detach() for g in GATES}
        out["expert_choice"] = self.expert_choice.detach()
        return out


def _schedule_probs(schedule) -> dict:
    if schedule is None or schedule == "random":
        return {k: 0.5 for k in SCHEDULE_KEYS}
    if schedule == "always":
        return {k: 1.0 for k in SCHEDULE_KEYS}
    if schedule == "never":
        return {k: 0.0 for k in SCHEDULE_KEYS}
    if not isinstance(schedule, dict):
        raise MemLMError(f"gate schedule must be a dict of probabilities, 'random', 'always' or 'never'; got {schedule!r}")
    unknown = set(schedule) - set(SCHEDULE_KEYS)
    if unknown:
        raise MemLMError(f"unknown gate schedule keys {sorted(unknown)}; use {', '.join(SCHEDULE_KEYS)}")
    out = {}
    for k in SCHEDULE_KEYS:
        v = schedule.get(k, 0.5)
        v = 0.5 if v == "random" else float(v)
        if not 0.0 <= v <= 1.0:
            raise MemLMError(f"gate schedule probability for {k} must be in [0, 1], got {v}")
        out[k] = v
    return out


class MetaController(nn.Module):
    """Policy + value network over the five HMST gates. See the module docstring."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        n_state_features: int = 4,
        hidden: int = 64,
        bias_scale: float = 1.0,
        vocab_size: int | None = None,
        max_context: int = 4096,
        detach_input: bool = True,
        init_gate_probs: dict | None = None,
        init_no_bias_prob: float = 0.5,
    ):
        super().__init__()
        if n_experts < 1:
            raise MemLMError(f"meta-controller needs n_experts >= 1, got {n_experts}")
        self.d_model, self.n_experts, self.n_state_features = d_model, n_experts, n_state_features
        self.bias_scale = float(bias_scale)
        self.max_entropy = math.log(vocab_size) if vocab_size and vocab_size > 1 else math.log(65536)
        self.max_context = int(max_context)
        self.detach_input = detach_input
        self.norm = nn.LayerNorm(d_model)
        self.trunk = nn.Sequential(
            nn.Linear(d_model + n_state_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.gate_head = nn.Linear(hidden, len(GATES))
        self.expert_head = nn.Linear(hidden, n_experts + 1)
        self.value_head = nn.Linear(hidden, 1)
        with torch.no_grad():
            # near-constant initial policy: small weights, biases give the initial probabilities
            for head in (self.gate_head, self.expert_head, self.value_head):
                head.weight.mul_(0.01)
                head.bias.zero_()
            init = {g: 0.5 for g in GATES}
            init.update(init_gate_probs or {})
            for i, g in enumerate(GATES):
                p = min(max(float(init[g]), 1e-4), 1 - 1e-4)
                self.gate_head.bias[i] = math.log(p / (1 - p))
            q = min(max(float(init_no_bias_prob), 1e-4), 1 - 1e-4)
            # P(no bias) = q, the rest uniform over experts
            self.expert_head.bias[n_experts] = math.log(q * n_experts / (1 - q))

    # ------------------------------------------------------------------ features
    def state_features(self, exit_entropy, context_len, occupancy, best_similarity) -> torch.Tensor:
        """[B, 4] features in [0, 1] (similarity in [-1, 1]).

        exit_entropy: nats of the early-exit head's next-token distribution, divided by
        log(vocab_size); context_len: tokens, as log1p(len) / log1p(max_context), capped at 1;
        occupancy: fraction of the memory in use; best_similarity: cosine of the best
        retrieved item (NaN, e.g. from an empty memory, becomes 0).
        """
        vals = [torch.as_tensor(x) for x in (exit_entropy, context_len, occupancy, best_similarity)]
        dev = next((v.device for v in vals if v.dim() > 0), vals[0].device)
        vals = torch.broadcast_tensors(*[v.to(dev, torch.float32).reshape(-1) for v in vals])
        h, c, o, s = vals
        return torch.stack(
            [
                (h / self.max_entropy).clamp(0, 1),
                (torch.log1p(c.clamp_min(0)) / math.log1p(self.max_context)).clamp(0, 1),
                o.clamp(0, 1),
                s.nan_to_num(0.0).clamp(-1, 1),
            ],
            dim=-1,
        )

    # ------------------------------------------------------------------ policy
    def _heads(self, pooled: torch.Tensor, features: torch.Tensor):
        if pooled.dim() != 2 or pooled.shape[1] != self.d_model:
            raise MemLMError(f"meta-controller pooled must be [B, {self.d_model}], got {tuple(pooled.shape)}")
        if features.shape != (pooled.shape[0], self.n_state_features):
            raise MemLMError(
                f"meta-controller features must be [{pooled.shape[0]}, {self.n_state_features}], got {tuple(features.shape)}"
            )
        if self.detach_input:
            pooled, features = pooled.detach(), features.detach()
        dtype = self.norm.weight.dtype
        x = torch.cat([self.norm(pooled.to(dtype)), features.to(dtype)], dim=-1)
        h = self.trunk(x)
        return self.gate_head(h).float(), self.expert_head(h).float(), self.value_head(h).squeeze(-1).float()

    @staticmethod
    def _stats(gate_logits, expert_logits, gates, choice):
        # Bernoulli: log p = logsigmoid(l), log(1-p) = logsigmoid(-l)
        lp_on, lp_off = F.logsigmoid(gate_logits), F.logsigmoid(-gate_logits)
        gate_lp = gates * lp_on + (1 - gates) * lp_off
        p = torch.sigmoid(gate_logits)
        gate_ent = -(p * lp_on + (1 - p) * lp_off)
        logp_e = F.log_softmax(expert_logits, dim=-1)
        exp_lp = logp_e.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        exp_ent = -(logp_e.exp() * logp_e).sum(-1)
        return gate_lp.sum(-1) + exp_lp, gate_ent.sum(-1) + exp_ent

    def forward(self, pooled, features, mode: str = "sample", schedule=None, generator=None) -> GateDecision:
        """Decide the gates for each row. ``generator`` must live on ``pooled``'s device."""
        if mode not in MODES:
            raise MemLMError(f"meta-controller mode must be one of {', '.join(MODES)}, got {mode!r}")
        gate_logits, expert_logits, value = self._heads(pooled, features)
        b, dev = pooled.shape[0], pooled.device
        p_gate = torch.sigmoid(gate_logits)
        p_exp = F.softmax(expert_logits, dim=-1)
        with torch.no_grad():
            if mode == "sample":
                gates = torch.bernoulli(p_gate, generator=generator)
                choice = torch.multinomial(p_exp, 1, generator=generator).squeeze(-1)
            elif mode == "greedy":
                gates = (p_gate > 0.5).float()
                choice = p_exp.argmax(-1)
            else:
                sp = _schedule_probs(schedule)
                probs = torch.tensor([sp[g] for g in GATES], device=dev).expand(b, len(GATES))
                gates = torch.bernoulli(probs, generator=generator)
                apply = torch.bernoulli(torch.full((b,), sp["expert_bias"], device=dev), generator=generator).bool()
                uniform = torch.full((b, self.n_experts), 1.0 / self.n_experts, device=dev)
                expert = torch.multinomial(uniform, 1, generator=generator).squeeze(-1)
                choice = torch.where(apply, expert, torch.full_like(expert, self.n_experts))
        log_prob, entropy = self._stats(gate_logits, expert_logits, gates, choice)
        bias = F.one_hot(choice, self.n_experts + 1)[:, : self.n_experts].to(pooled.dtype) * self.bias_scale
        probs = {g: p_gate[:, i] for i, g in enumerate(GATES)}
        probs["expert"] = p_exp
        return GateDecision(
            exit=gates[:, 0], episodic=gates[:, 1], semantic=gates[:, 2], verify=gates[:, 3],
            expert_choice=choice, expert_bias=bias, log_prob=log_prob, entropy=entropy, value=value, probs=probs,
        )

    def _choice_from(self, actions: dict) -> torch.Tensor:
        if "expert_choice" in actions:
            return torch.as_tensor(actions["expert_choice"]).long()
        bias = actions["expert_bias"]
        has = bias.abs().amax(-1) > 0
        return torch.where(has, bias.abs().argmax(-1), torch.full_like(has, self.n_experts, dtype=torch.long))

    def log_prob_of(self, pooled, features, actions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log_prob[B], entropy[B], value[B]) of given actions under the current policy (for the PPO ratio).

        ``actions``: a :class:`GateDecision` or a dict with the four gate tensors and
        ``expert_choice`` (or ``expert_bias``, from which the choice is recovered).
        """
        if isinstance(actions, GateDecision):
            actions = {**actions.actions()}
        gate_logits, expert_logits, value = self._heads(pooled, features)
        gates = torch.stack([torch.as_tensor(actions[g]).to(gate_logits) for g in GATES], dim=-1)
        choice = self._choice_from(actions).to(gate_logits.device)
        log_prob, entropy = self._stats(gate_logits, expert_logits, gates, choice)
        return log_prob, entropy, value


# ---------------------------------------------------------------------- PPO and reward
def ppo_loss(
    new_log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    clip: float = 0.2,
    vf_coef: float = 0.5,
    ent_coef: float = 0.01,
    entropy: torch.Tensor | None = None,
    normalize_advantages: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Clipped PPO objective (to minimise) with a value loss and an entropy bonus.

    loss = -mean(min(r A, clip(r, 1-eps, 1+eps) A)) + vf_coef * mean((V - R)^2) - ent_coef * mean(H),
    r = exp(new_log_prob - old_log_prob). ``old_log_prob``, ``advantages`` and ``returns`` are
    treated as constants. Advantages are normalised to zero mean and unit std (over the batch,
    when it has more than one element).
    """
    old = old_log_prob.detach()
    adv = advantages.detach().float()
    if normalize_advantages and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
    log_ratio = new_log_prob.float() - old.float()
    ratio = log_ratio.exp()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip, 1 + clip) * adv
    policy_loss = -torch.min(surr1, surr2).mean()
    value_loss = F.mse_loss(values.float(), returns.detach().float())
    loss = policy_loss + vf_coef * value_loss
    ent = entropy.float().mean() if entropy is not None else torch.zeros((), device=loss.device)
    if entropy is not None:
        loss = loss - ent_coef * ent
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss.detach(),
            "value_loss": value_loss.detach(),
            "entropy": ent.detach(),
            "approx_kl": ((ratio - 1) - log_ratio).mean().detach(),  # unbiased KL(old||new) estimator
            "clip_frac": ((ratio - 1).abs() > clip).float().mean(),
            "ratio_mean": ratio.mean().detach(),
        }
    return loss, stats


def compute_reward(quality, flops, latency, calibration, lambda_compute, lambda_latency, lambda_calib):
    """Reward = quality - lambda_compute * flops - lambda_latency * latency + lambda_calib * calibration.

    Pass ``flops`` as the executed fraction of the full model's FLOPs (0..1) and ``latency``
    in seconds (or normalised the same way) so the lambdas are comparable across model sizes.
    Works elementwise on tensors or floats.
    """
    return quality - lambda_compute * flops - lambda_latency * latency + lambda_calib * calibration


def calibration_score(p_correct, correct):
    """1 - (p - y)^2 (a Brier score turned into a reward in [0, 1]); elementwise."""
    return 1.0 - (p_correct - correct) ** 2
