"""Stage 3 of HMST: the meta-controller learns its gates by reinforcement, the rest is frozen.

:class:`RLPhase` is what :class:`memlm.callbacks.rl_stage.RLStage` installs on an
``HMSTLanguageModel``. Each training step it

1. runs the frozen model on the batch with gates *sampled from the current policy*
   (no gradient), timing the forward;
2. scores every row: quality = the log-likelihood gain of the path taken over the early-exit
   head (nats per target token: with the kNN-LM output, a row that exits gains what memory
   adds to the exit head, else 0), compute = the metered cost of that row's gates as a
   fraction of all gates on (see :class:`RowCost`; the forward gets the targets as its
   ``score_mask``, so a row that exits searches memory only where it is scored, as the engine's
   prefill searches only for the position it samples from), latency = the forward's
   measured seconds shared out over the rows in proportion to their metered compute (one
   batched forward has no per-row clock; the shares sum to the measured time), and, when
   ``lambda_calibration`` > 0, calibration on the rows whose verify gate fired (see
   :meth:`RLPhase.row_calibration`);
3. adds the decisions to a rollout; every ``rollout_steps`` steps the policy is updated on
   it (PPO epochs or one REINFORCE pass) and the rollout is discarded, so every update
   uses log-probabilities of the policy that acted.

Logged: ``rl/gate_<g>`` rates, ``rl/reward_<part>``, ``rl/entropy``, ``rl/kl_old``,
``rl/approx_kl``, ``rl/grad_norm``, ``rl/quality``, ``rl/compute`` (the trade-off over training).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memlm.core.errors import MemLMError
from memlm.core.meter import ComputeMeter
from memlm.models.hmst.controller import GATES, calibration_score
from memlm.models.hmst.policy_gradient import RewardConfig, RLConfig, start_rollout, update_policy

IGNORE_INDEX = -100
ALL_ON = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 1.0, "expert_bias": 0.0}


def _forward_cost(module, x, state, schedule, score_mask=None) -> float:
    """Metered compute of one forward with a fixed (0/1) schedule: the model's own meter when
    it returns one, else torch FLOPs counted by FlopCounterMode."""
    meter = ComputeMeter()
    kw = {} if score_mask is None else {"score_mask": score_mask}
    with torch.no_grad():
        with meter.measure("forward"):
            out = module(x, state=state, gate_mode="schedule", schedule=schedule, return_exit_logits=False, **kw)
    return output_compute(out, meter)


def output_compute(out, measured: ComputeMeter | None = None) -> float:
    """The forward's own metered total (``HMSTOutput.compute``), else what ``measured`` counted."""
    own = getattr(out, "compute", None)
    if isinstance(own, ComputeMeter):
        return float(own.total())
    return measured.total() if measured is not None else 0.0


def critic_call_cost(critic, length: int) -> float:
    """FLOPs of one critic call on ``length`` tokens (FlopCounterMode, measured once)."""
    meter = ComputeMeter()
    dev = next(critic.parameters()).device
    q = torch.ones(1, max(1, length // 3), dtype=torch.long, device=dev)
    # in eval mode nn.TransformerEncoder takes its fused fast path, whose matmuls FlopCounterMode
    # does not see (it counted 256 FLOPs for a 2-layer critic); train mode runs the same maths
    # unfused (the critic's dropout is 0 by default, and nothing here is learned)
    was_training = critic.training
    critic.train()
    try:
        with torch.no_grad(), meter.measure("critic"):
            critic(q, q, q, pad_id=-1)
    finally:
        critic.train(was_training)
    return meter.total()


@dataclass
class RowCost:
    """Per-row compute of a decision, from metered forwards with every gate forced on or off.

    Every gated part is per row, so a batch's cost is the sum of its rows' costs:
    ``row = exit_path + semantic * search + (1 - exit) * (upper - (1 - semantic) * semantic_cost
    - (1 - episodic) * episodic_cost) + verify * critic``, each term measured on the same batch.
    ``search`` is what the semantic gate costs a row that exits (the FAISS search and the kNN-LM
    output when ``mem_knn_lambda`` > 0; else 0, an exiting row reads nothing) when it searches
    for every position; with a score mask (the forward's ``score_mask``: only the positions with
    targets are scored) it searches only the queries those positions read, and its cost is
    ``queries * query_cost + knn_output_flops(queries, T)`` (``rows(..., queries=)``), ``semantic_cost``
    what it adds on a row that runs on (the reader); ``all_on`` is the cost of a row with every
    gate on (no exit, both reads, verification).
    """

    exit_path: float
    upper: float
    semantic: float
    episodic: float
    critic: float
    search: float = 0.0
    query_cost: float = 0.0  # one FAISS query's FLOP-equivalents
    knn_flops: object = None  # (queries, positions) -> FLOPs of the kNN-LM output (the model's own formula)
    positions: int = 0  # T of the measured rows

    @classmethod
    def measure(cls, module, x, state=None) -> "RowCost":
        b = x.size(0)
        base = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, "expert_bias": 0.0}
        full = _forward_cost(module, x, state, base)
        exit_sem = _forward_cost(module, x, state, {**base, "exit": 1.0})
        exit_bare = _forward_cost(module, x, state, {**base, "exit": 1.0, "semantic": 0.0})
        no_sem = _forward_cost(module, x, state, {**base, "semantic": 0.0})
        no_ep = _forward_cost(module, x, state, {**base, "episodic": 0.0})
        critic = critic_call_cost(module.model.critic, module.config.critic_max_len)
        search = max(0.0, exit_sem - exit_bare)
        sem, model = module.semantic, module.model
        q_cost = sem.query_cost(model.cfg.mem_top_k) if hasattr(sem, "query_cost") else 0.0
        knn = model.knn_output_flops if model.cfg.mem_knn_lambda > 0 else None
        return cls(exit_path=exit_bare / b, upper=(full - exit_sem) / b,
                   semantic=max(0.0, full - no_sem - search) / b, episodic=max(0.0, full - no_ep) / b,
                   critic=critic, search=search / b, query_cost=q_cost, knn_flops=knn, positions=x.size(1))

    @property
    def all_on(self) -> float:
        return self.exit_path + self.search + self.upper + self.critic

    def rows(self, exit, episodic, semantic, verify, queries=None) -> torch.Tensor:
        """[B] FLOP-equivalents of each row's gates. ``queries`` [B]: the searches a row that
        exits makes under the forward's score mask (:func:`exit_row_queries`); None = every position's."""
        cont = 1.0 - exit.float()
        upper = self.upper - (1 - semantic.float()) * self.semantic - (1 - episodic.float()) * self.episodic
        search = torch.as_tensor(self.search)
        if queries is not None and self.knn_flops is not None:
            q = queries.float()
            exit_search = q * self.query_cost + self.knn_flops(q, self.positions)
            # a row that runs on searches every position: the difference is in its upper term
            search = exit.float() * exit_search + cont * self.search
        return self.exit_path + semantic.float() * search + cont * upper + verify.float() * self.critic


def exit_row_queries(model, score_mask: torch.Tensor) -> torch.Tensor:
    """[B] the memory queries a row that exits makes when only ``score_mask``'s positions are scored."""
    B, T = score_mask.shape
    rows = torch.arange(B, device=score_mask.device)
    need = model._knn_need(rows, torch.zeros(B, dtype=torch.bool, device=score_mask.device), T, T, score_mask,
                           max(1, model.cfg.mem_query_stride))
    nq = (T + max(1, model.cfg.mem_query_stride) - 1) // max(1, model.cfg.mem_query_stride)
    return torch.full((B,), nq, device=score_mask.device) if need is None else need.sum(1)


class RLPhase:
    """Installed on the module by the RL callback; see the module docstring."""

    def __init__(self, rl: RLConfig, reward: RewardConfig, rollout_steps: int = 1, max_grad_norm: float = 1.0,
                 write_memory: bool = False, calib_span: int = 8) -> None:
        if rollout_steps < 1:
            raise MemLMError(f"rl rollout_steps must be >= 1, got {rollout_steps}")
        self.rl, self.reward = rl, reward
        self.rollout_steps, self.max_grad_norm, self.write_memory = int(rollout_steps), max_grad_norm, write_memory
        self.calib_span, self.calib_fact_tokens = int(calib_span), 48
        if self.calib_span < 1:
            raise MemLMError(f"rl calib_span must be >= 1, got {calib_span}")
        self.rollout = None
        self.row_cost: RowCost | None = None
        self.last_stats: dict = {}

    # -- module set-up ------------------------------------------------------------------------------
    def freeze(self, module) -> None:
        """Only the controller trains; everything else keeps its stage-1/2 weights."""
        for name, p in module.named_parameters():
            p.requires_grad_(name.startswith("model.controller."))
        module.automatic_optimization = False
        module.gate_mode = "sample"

    # -- one step ---------------------------------------------------------------------------------
    def row_rewards(self, module, x, y, out, seconds: float) -> dict:
        d = out.decision
        valid = (y != IGNORE_INDEX).float()
        n = valid.sum(1).clamp_min(1)

        def row_nll(logits):
            ce = F.cross_entropy(logits.float().transpose(1, 2), y.clamp_min(0), reduction="none")
            return (ce * valid).sum(1) / n

        quality = row_nll(out.exit_logits) - row_nll(out.logits)  # 0 for rows that exited
        # a row that exits searched memory only for its scored positions (the forward's score_mask)
        flops = self.row_cost.rows(d.exit, d.episodic, d.semantic, d.verify, exit_row_queries(module.model, valid > 0))
        compute = flops / self.row_cost.all_on
        latency = seconds * flops / flops.sum().clamp_min(1e-12)
        calibration = self.row_calibration(module, x, y, out) if self.reward.lambda_calibration else None
        return self.reward.parts(quality, compute, latency, calibration)

    @torch.no_grad()
    def row_calibration(self, module, x, y, out) -> torch.Tensor:
        """[B] calibration of the critic on the rows it was asked about (verify fired), 0 elsewhere.

        The row's draft answer is the model's greedy prediction of its last ``calib_span``
        target tokens; it is right when at least half of them are. The critic scores
        (the tokens before the span, the draft, the top semantic item the row's last query
        read), and the row earns ``calibration_score(p, right) - 0.75`` = ``0.25 - (p - right)^2``:
        0 for a critic that always says 0.5, up to +0.25 for a sure and right one, down to
        -0.75 for a sure and wrong one. So verification pays only where the critic knows
        something, and its cost is in the compute term already (one critic call per row)."""
        verify = out.decision.verify.float()
        span = max(1, min(self.calib_span, x.size(1) // 4))
        target = y[:, -span:]
        draft = out.logits[:, -span:].argmax(-1)
        valid = target != IGNORE_INDEX
        right = (((draft == target) & valid).sum(1).float() >= 0.5 * valid.sum(1).clamp_min(1).float()).float()
        facts = self._top_item_ids(module, out, x.size(0), x.device)
        p = module.model.critic(x[:, :-span], draft, facts, pad_id=-1).p_correct.float()
        return verify * (calibration_score(p, right) - 0.75)

    def _top_item_ids(self, module, out, rows: int, device) -> torch.Tensor:
        """Token ids of the top item each row's last memory query read ([B, L], -1 padded; one -1
        column when nothing was read or the items have no text or the module no tokenizer)."""
        ids = out.retrieved_ids
        tok = getattr(module, "tokenizer", None)
        empty = torch.full((rows, 1), -1, dtype=torch.long, device=device)
        if ids is None or ids.numel() == 0 or tok is None or len(module.semantic) == 0:
            return empty
        top = ids[:, -1, 0].cpu()
        texts = module.semantic.get_texts(top.clamp_min(0))
        enc = [tok.encode(t)[: self.calib_fact_tokens] if (t and int(i) >= 0) else [] for t, i in zip(texts, top.tolist())]
        width = max(1, max(len(e) for e in enc))
        return torch.tensor([e + [-1] * (width - len(e)) for e in enc], dtype=torch.long, device=device)

    def training_step(self, module, batch: dict, batch_idx: int):
        x, y = batch["input_ids"], batch["targets"]
        if self.row_cost is None:
            self.row_cost = RowCost.measure(module, x, module.carried_state)
        controller = module.model.controller
        if self.rollout is None:
            self.rollout = start_rollout(controller)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = module(x, state=module.carried_state, gate_mode="sample", return_exit_logits=True,
                         score_mask=y != IGNORE_INDEX)
            seconds = time.perf_counter() - t0
        module.carried_state = module.detach_state(out.state)
        module.last_gate_decision = out.decision  # the sampled policy, for GateHistograms
        parts = self.row_rewards(module, x, y, out, seconds)
        self.rollout.add(out.decision, out.pooled, out.features, parts["total"])
        if self.write_memory:
            module._write_memories(x, out)
        log = {f"rl/reward_{k}": v.mean() for k, v in parts.items()}
        for g in GATES:
            log[f"rl/gate_{g}"] = getattr(out.decision, g).float().mean()
        log["rl/gate_expert_bias"] = (out.decision.expert_choice < module.config.n_experts).float().mean()
        log["rl/quality"] = parts["quality"].mean()
        log["rl/compute"] = -parts["compute"].mean() / max(self.reward.lambda_compute, 1e-12)
        if len(self.rollout) >= self.rollout_steps:
            opt = module.optimizers()
            stats = update_policy(controller, opt, self.rollout, self.rl, self.max_grad_norm,
                                  backward=module.manual_backward)
            self.rollout = None
            sched = module.lr_schedulers()
            if sched is not None:
                for _ in range(self.rl.epochs if self.rl.algorithm == "ppo" else 1):
                    sched.step()
            self.last_stats = stats
            for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "kl_old", "grad_norm", "clip_frac"):
                if k in stats:
                    log[f"rl/{k}"] = torch.tensor(stats[k])
        module.log_dict(log, on_step=True, on_epoch=False, prog_bar=False)
        module.log("rl/reward", log["rl/reward_total"], on_step=True, on_epoch=False, prog_bar=True)
        return None
