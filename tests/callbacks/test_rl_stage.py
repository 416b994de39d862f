"""Stage 3 through a real Trainer: the controller (and only it) learns, the reward's compute term is the
meter's, a frozen controller stays put, and a bad starting checkpoint is one clear error."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from memlm.callbacks.rl_stage import RLStage, load_stage_checkpoint
from memlm.core.errors import MemLMError
from memlm.core.meter import ComputeMeter
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.hmst.rl_phase import RowCost, _forward_cost, exit_row_queries

V, T, B = 64, 16, 4
SIZES = dict(vocab_size=V, block_size=T, n_layer=2, n_head=2, d_model=16, d_ff=16, n_experts=2, top_k=1, exit_layer=1,
             ssm_d_state=4, ssm_expand=1, mem_top_k=2, mem_query_stride=4, mem_write_stride=4, episodic_capacity=16,
             controller_hidden=16, critic_d_model=16, critic_layers=1, critic_heads=2, critic_max_len=24)


def module(**kw):
    torch.manual_seed(0)
    return HMSTLanguageModel(**{**SIZES, **kw})


def save_checkpoint(m, path):
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def batches(n=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (n, T + 1), generator=g)
    return [{"input_ids": r[:-1], "targets": r[1:]} for r in ids]


def fit(m, cb, steps):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], num_sanity_val_steps=0,
                        gradient_clip_val=None)
    trainer.fit(m, train_dataloaders=DataLoader(batches(), batch_size=B))
    return trainer


def snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce"])
def test_stage3_trains_only_the_controller(tmp_path, algorithm):
    ckpt = save_checkpoint(module(), tmp_path / "stage1.ckpt")
    m = module()
    cb = RLStage(init_checkpoint=ckpt, algorithm=algorithm, epochs=2, lambda_compute=0.5)
    fit(m, cb, steps=4)
    start = torch.load(ckpt, weights_only=True)["state_dict"]
    changed = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert changed and all(n.startswith("model.controller.") for n in changed)
    assert any(n.startswith("model.controller.gate_head") for n in changed)
    stats = m.rl_phase.last_stats
    assert stats["grad_norm"] > 0 and stats["first_ratio_dev"] < 1e-5  # fresh rollout: ratio 1 on the first pass
    assert m.rl_phase.rollout is None  # consumed by the update: never reused with stale log-probs


def test_frozen_controller_does_not_change(tmp_path):
    ckpt = save_checkpoint(module(), tmp_path / "stage1.ckpt")
    m = module()
    # RLStage freezes the base; a controller frozen as well has nothing to learn and must stay put
    cb = RLStage(init_checkpoint=ckpt, epochs=1)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], num_sanity_val_steps=0)
    cb.setup(trainer, m, "fit")
    before = snapshot(m)
    for p in m.model.controller.parameters():
        p.requires_grad_(False)
    phase = m.rl_phase
    # drive the phase by hand with a plain optimizer over nothing trainable
    from memlm.models.hmst.policy_gradient import start_rollout, update_policy

    x = torch.stack([b["input_ids"] for b in batches(B)])
    with torch.no_grad():
        out = m(x, gate_mode="sample", return_exit_logits=True)
    ro = start_rollout(m.model.controller)
    ro.add(out.decision, out.pooled, out.features, torch.randn(B))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(RuntimeError):  # nothing requires grad: backward has no graph
        update_policy(m.model.controller, opt, ro, phase.rl)
    after = snapshot(m)
    assert all(torch.equal(before[n], after[n]) for n in before)


def fill_memory(m, n=32):
    """Items in the semantic memory, so that a semantic read has something to cost."""
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(n, SIZES["d_model"], generator=g)
    values = m.model.wte.weight.detach()[torch.randint(0, V, (n,), generator=g)]
    m.semantic.add(keys, values)


@pytest.mark.parametrize("knn", [0.0, 0.5])
def test_reward_compute_term_is_the_meter_count(tmp_path, knn):
    m = module(mem_value="next_token", mem_knn_lambda=knn)
    m.eval()
    fill_memory(m)
    x = torch.stack([b["input_ids"] for b in batches(B)])
    cost = RowCost.measure(m, x)
    assert cost.semantic > 0  # the reader's work on a row that runs on
    # an exiting row searches memory only with the kNN-LM output
    assert (cost.search > 0) == (knn > 0)
    # all gates on per row, measured directly
    full = _forward_cost(m, x, None, {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0})
    on = torch.ones(B)
    assert cost.rows(on * 0, on, on, on * 0).sum().item() == pytest.approx(full, rel=1e-6)
    for sched, gates in [({"exit": 1.0}, (on, on, on)), ({"semantic": 0.0}, (on * 0, on, on * 0)),
                         ({"exit": 1.0, "semantic": 0.0}, (on, on, on * 0)),
                         ({"episodic": 0.0}, (on * 0, on * 0, on))]:
        s = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, **sched}
        metered = _forward_cost(m, x, None, s)
        exit_, ep, sem = gates
        assert cost.rows(exit_, ep, sem, on * 0).sum().item() == pytest.approx(metered, rel=1e-6)
    assert cost.rows(on, on, on, on * 0).sum() < cost.rows(on * 0, on, on, on * 0).sum()  # exiting saves compute
    # a verify call adds exactly one critic call's FLOPs: at least the matmuls of its encoder
    # layers over the tokens it reads (nn.TransformerEncoder's eval fast path hides them from
    # FlopCounterMode, which once made a critic call cost 256 FLOPs)
    crit = m.model.critic
    n_tok = min(3 * (SIZES["critic_max_len"] // 3) + 3, SIZES["critic_max_len"])  # parts + [CLS] [SEP] [SEP], cut to max_len
    linear = sum(p.numel() for n, p in crit.encoder.named_parameters() if p.dim() == 2)
    added = (cost.rows(on[:1] * 0, on[:1], on[:1], on[:1]) - cost.rows(on[:1] * 0, on[:1], on[:1], on[:1] * 0)).item()
    assert added == pytest.approx(cost.critic) and added >= 2 * n_tok * linear
    assert crit.training is False  # measuring it left the critic in eval mode


def test_reward_compute_with_a_score_mask_is_the_meter_count(tmp_path):
    """Rows scored only on some targets (an answer span): a row that exits searches memory only
    for those, and its cost in the reward is still exactly what the forward's meter counted."""
    m = module(mem_value="next_token", mem_knn_lambda=0.5, mem_query_stride=2)
    m.eval()
    fill_memory(m)
    x = torch.stack([b["input_ids"] for b in batches(B)])
    T = x.size(1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for r in range(B):  # a different answer span per row, one row scored everywhere
        mask[r, T - 3 - r:] = True
    mask[0] = True
    cost = RowCost.measure(m, x)
    q = exit_row_queries(m.model, mask)
    assert q[0] == (T + 1) // 2 and (q[1:] < q[0]).all()
    on = torch.ones(B)
    patterns = [({"exit": 1.0}, (on, on, on)), ({}, (on * 0, on, on)), ({"exit": 1.0, "semantic": 0.0}, (on, on, on * 0))]
    for sched, (exit_, ep, sem) in patterns:
        s = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, **sched}
        metered = _forward_cost(m, x, None, s, score_mask=mask)
        assert cost.rows(exit_, ep, sem, on * 0, q).sum().item() == pytest.approx(metered, rel=1e-6)
    full_mask_cost = cost.rows(on, on, on, on * 0).sum()
    assert cost.rows(on, on, on, on * 0, q).sum() < full_mask_cost  # exiting rows scored on a span search less


def test_stage3_checkpoint_errors(tmp_path):
    m = module()
    with pytest.raises(MemLMError, match="init_checkpoint"):
        load_stage_checkpoint(m, None, "stage 3")
    with pytest.raises(MemLMError, match="not found"):
        load_stage_checkpoint(m, str(tmp_path / "missing.ckpt"), "stage 3")
    other = save_checkpoint(module(d_model=32, n_head=2), tmp_path / "big.ckpt")
    with pytest.raises(MemLMError, match="does not fit"):
        load_stage_checkpoint(m, other, "stage 3")
    wrong = {"state_dict": {}, "memlm": {"class_path": "memlm.lightning_modules.transformer.TransformerLM"}}
    torch.save(wrong, tmp_path / "gpt.ckpt")
    with pytest.raises(MemLMError, match="TransformerLM"):
        load_stage_checkpoint(m, str(tmp_path / "gpt.ckpt"), "stage 3")


def test_stage3_refuses_a_checkpoint_whose_memory_items_mean_something_else(tmp_path):
    s2 = module(mem_value="next_token", mem_key_window=3)
    ckpt = {"state_dict": s2.state_dict(), "hyper_parameters": dict(s2.hparams)}
    s2.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "s2.ckpt")
    with pytest.raises(MemLMError, match="trained with model.mem_value=next_token.*set model.mem_value: next_token"):
        load_stage_checkpoint(module(), str(tmp_path / "s2.ckpt"), "stage 3")
    load_stage_checkpoint(module(mem_value="next_token", mem_key_window=3), str(tmp_path / "s2.ckpt"), "stage 3")


def _phase_and_output(m, verify_logit: float):
    """An RLPhase on ``m`` (stage-3 set-up by hand) and one sampled forward with a known verify gate."""
    from memlm.lightning_modules.hmst.rl_phase import RLPhase
    from memlm.models.hmst.policy_gradient import RewardConfig, RLConfig

    phase = RLPhase(RLConfig(), RewardConfig(lambda_compute=0.5, lambda_latency=1.0, lambda_calibration=1.0),
                    calib_span=4)
    x = torch.stack([b["input_ids"] for b in batches(B)])
    y = torch.stack([b["targets"] for b in batches(B)])
    phase.row_cost = RowCost.measure(m, x)
    ctl = m.model.controller
    with torch.no_grad():  # greedy-known gates: never exit, both reads, verify as asked
        ctl.gate_head.weight.zero_()
        ctl.gate_head.bias.copy_(torch.tensor([-10.0, 10.0, 10.0, verify_logit]))
        out = m(x, gate_mode="greedy", return_exit_logits=True)
    return phase, x, y, out


def test_latency_is_the_measured_time_shared_by_metered_compute():
    m = module().eval()
    phase, x, y, out = _phase_and_output(m, verify_logit=10.0)
    d = out.decision
    with torch.no_grad():
        d.verify[:2] = 0  # two rows skip the critic: they cost less, so they take less of the time
    parts = phase.row_rewards(m, x, y, out, seconds=0.8)
    latency = -parts["latency"]  # lambda_latency = 1
    flops = phase.row_cost.rows(d.exit, d.episodic, d.semantic, d.verify)
    assert latency.sum().item() == pytest.approx(0.8)
    assert torch.allclose(latency, 0.8 * flops / flops.sum())
    assert latency[0] < latency[2]


def test_calibration_term_scores_the_critic_on_verified_rows_only():
    """calibration = verify * (0.25 - (p - right)^2), with right = the greedy draft of the last
    calib_span targets being at least half right, p = the critic's score of (prefix, draft, facts)."""
    m = module().eval()
    phase, x, y, out = _phase_and_output(m, verify_logit=10.0)
    with torch.no_grad():
        m.model.critic.head.weight.zero_()
        m.model.critic.head.bias.fill_(3.0)  # p = sigmoid(3) for every row
    p = torch.sigmoid(torch.tensor(3.0))
    draft = out.logits[:, -4:].argmax(-1)
    right = ((draft == y[:, -4:]).float().mean(1) >= 0.5).float()
    parts = phase.row_rewards(m, x, y, out, seconds=0.1)
    assert torch.allclose(parts["calibration"], 0.25 - (p - right) ** 2, atol=1e-6)
    y_right = y.clone()
    y_right[:, -4:] = draft  # every draft right: the sure critic earns the most
    assert torch.allclose(phase.row_rewards(m, x, y_right, out, 0.1)["calibration"], 0.25 - (p - 1) ** 2, atol=1e-6)
    phase_off, x, y, out_off = _phase_and_output(m, verify_logit=-10.0)  # no verification: no term
    assert torch.equal(phase_off.row_rewards(m, x, y, out_off, 0.1)["calibration"], torch.zeros(B))
