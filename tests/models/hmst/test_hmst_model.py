"""HMST model and module: episodic carry, early exit FLOPs, gate log-probs, memories, checkpoints."""

import lightning as L
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memlm.core.sampling import SamplingParams
from memlm.models.hmst.controller import GATES
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.language_model import OptimizerConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread is faster and immune to CPU oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

ALL_ON = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, "expert_bias": 0.0}


def small(**kw):
    torch.manual_seed(0)
    args = dict(
        vocab_size=64, block_size=16, n_layer=4, n_head=2, d_model=32, d_ff=32, n_experts=4, top_k=2, exit_layer=2,
        ssm_d_state=4, ssm_expand=1, mem_top_k=2, mem_max_items=1000, mem_write_stride=2, episodic_capacity=16,
        controller_hidden=16, critic_d_model=16, critic_layers=1, critic_heads=2, critic_max_len=32,
        optimizer=OptimizerConfig(warmup_steps=1),
        eval_gate_schedule=ALL_ON,
    )
    args.update(kw)
    return HMSTLanguageModel(**args)


def test_token_two_segments_back_changes_output_through_episodic_state():
    m = small().eval()
    with torch.no_grad():  # a trained-looking episodic read path (at init it is deliberately faint)
        m.model.ep_proj.weight.normal_(0, 0.3)
        m.model.ep_gate.bias.fill_(2.0)
    torch.manual_seed(1)
    segs = [torch.randint(0, 64, (1, 16)) for _ in range(3)]
    changed = [s.clone() for s in segs]
    changed[0][0, 5] = (changed[0][0, 5] + 7) % 64

    def run(seq, carry=True):
        state, out = None, None
        with torch.no_grad():
            for s in seq:
                out = m(s, state=state if carry else None)
                state = out.state
        return out.logits

    diff = (run(segs) - run(changed)).abs().max().item()
    assert diff > 1e-5, "a token two segments back must reach the current segment through the SSM state"
    # attention alone cannot see it: without the carried state the third segment is identical
    assert (run(segs, carry=False) - run(changed, carry=False)).abs().max().item() == 0.0
    # and the carried SSM state equals running the whole stream through the SSM at once
    with torch.no_grad():
        whole = m.model.ssm[0](m.model.ssm_norms[0](m.model.wte(torch.cat(segs, 1))))[1]
        state = None
        for s in segs:
            state = m(s, state=state).state
    torch.testing.assert_close(state.ssm[0][1], whole[1], rtol=1e-4, atol=1e-5)


def test_early_exit_really_skips_upper_layers_and_saves_flops():
    m = small(n_layer=6, exit_layer=2).eval()
    x = torch.randint(0, 64, (4, 16))
    calls = []
    hooks = [b.register_forward_hook(lambda mod, i, o: calls.append(1)) for b in m.model.blocks[2:]]

    def flops(schedule):
        calls.clear()
        fc = FlopCounterMode(display=False)
        with fc, torch.no_grad():
            out = m(x, schedule=schedule)
        return fc.get_total_flops(), len(calls), out

    f_full, n_full, out_full = flops(ALL_ON)
    f_exit, n_exit, out_exit = flops({**ALL_ON, "exit": 1.0})
    # cached generation with the exit gate held on never touches the upper blocks either
    calls.clear()
    m.eval_schedule = {**ALL_ON, "exit": 1.0}
    toks = list(m.generate(x[0, :5].tolist(), SamplingParams(4, temperature=0)))
    assert len(toks) == 4 and len(calls) == 0
    m.eval_schedule = ALL_ON
    for h in hooks:
        h.remove()
    assert n_full == 4 and n_exit == 0  # upper blocks never ran
    assert f_exit < 0.6 * f_full, (f_exit, f_full)
    assert out_exit.metrics["exit_layers_skipped_frac"].item() == pytest.approx(4 / 6)
    # exiting rows use the exit head: logits = lm_head(exit_norm(h after exit_layer blocks))
    torch.testing.assert_close(out_exit.logits, m.model.lm_head(out_exit.mem_keys))
    # mixed batch: only the exiting rows skip
    decision = out_full.decision
    decision.exit = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out_mix = m(x, decision=decision)
    rows = out_mix.exit_rows
    assert rows.tolist() == [True, False, True, False]
    assert out_mix.layers_run == pytest.approx(2 + 4 * 0.5)
    torch.testing.assert_close(out_mix.logits[~rows], out_full.logits[~rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_mix.logits[rows], out_exit.logits[rows], rtol=1e-5, atol=1e-5)


def test_gate_log_probs_match_the_sampled_actions():
    m = small()
    ctl = m.model.controller
    torch.manual_seed(3)
    pooled, feats = torch.randn(6, 32), torch.rand(6, 4)
    with torch.no_grad():  # a policy far from uniform so that the check is not trivial
        ctl.gate_head.weight.normal_(0, 1.0)
        ctl.expert_head.weight.normal_(0, 1.0)
    for mode in ("sample", "greedy", "schedule"):
        d = ctl(pooled, feats, mode=mode, schedule={"exit": 0.3, "episodic": 1.0, "semantic": 0.0, "verify": 0.5, "expert_bias": 0.5})
        manual = torch.zeros(6)
        for g in GATES:
            p, a = d.probs[g], getattr(d, g)
            manual += torch.where(a > 0.5, p.log(), (1 - p).log())
        manual += d.probs["expert"].gather(1, d.expert_choice[:, None]).squeeze(1).log()
        torch.testing.assert_close(d.log_prob, manual, rtol=1e-5, atol=1e-5)
        lp, _, _ = ctl.log_prob_of(pooled, feats, d.actions())
        torch.testing.assert_close(lp, d.log_prob)
    # REINFORCE-style gradient reaches the policy
    d = ctl(pooled, feats, mode="sample")
    d.log_prob.sum().backward()
    assert ctl.gate_head.weight.grad.abs().sum() > 0
    # the expert-bias gate steers the routers of the upper layers
    x = torch.randint(0, 64, (2, 16))
    m.eval()
    out = m(x, schedule={**ALL_ON, "expert_bias": 1.0}, generator=torch.Generator().manual_seed(0))
    assert bool((out.decision.expert_choice < 4).all())
    assert out.decision.expert_bias.abs().sum(-1).gt(0).all()


def test_training_step_losses_memory_writes_and_gate_metrics():
    m = small(gate_schedule={"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 1.0, "expert_bias": 0.0})
    logged = {}
    m.log = lambda k, v, **kw: logged.__setitem__(k, float(v))
    x = torch.randint(0, 64, (3, 16))
    y = torch.roll(x, -1, 1)
    loss = m.training_step({"input_ids": x, "targets": y, "first": True}, 0)
    assert torch.isfinite(loss)
    for key in ("aux/balance", "aux/router_z", "aux/exit", "aux/critic", "mem/router_entropy", "mem/expert_load_0",
                "mem/gate_semantic", "mem/gate_exit", "train/loss"):
        assert key in logged, key
    assert sum(logged[f"mem/expert_load_{i}"] for i in range(4)) == pytest.approx(1.0, abs=1e-5)
    assert len(m.semantic) == 3 * 8  # every 2nd token of 3 rows
    assert len(m.episodic) == 3
    loss.backward()
    assert m.model.critic.head.weight.grad.abs().sum() > 0
    assert m.model.exit_norm.weight.grad.abs().sum() > 0
    # second chunk: the state is carried and the semantic memory is now read
    m.training_step({"input_ids": x, "targets": y, "first": False}, 1)
    assert m.carried_state.pos == 32
    assert logged["mem/semantic_best_sim"] > 0.5  # identical text: its own earlier keys come back


def test_generate_with_cache_equals_without_cache():
    m = small().eval()
    prompt = torch.randint(0, 64, (10,)).tolist()
    a = list(m.generate(prompt, SamplingParams(5, temperature=0, use_cache=True)))
    b = list(m.generate(prompt, SamplingParams(5, temperature=0, use_cache=False)))
    assert a == b and len(a) == 5


class _Tok:
    """Minimal tokenizer over the characters of a fixed alphabet (for ingest tests)."""

    pad_id = 63
    eos_id = 62
    vocab_size = 64

    def encode(self, text):
        return [ord(c) % 60 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 40) for i in ids)

    def token_bytes(self):
        return [1] * 64


def test_ingest_writes_retrievable_items():
    m = small(mem_write_stride=1)
    m.tokenizer = _Tok()
    ids = m.ingest("the quick brown fox jumps over the lazy dog" * 2)
    n = len("the quick brown fox jumps over the lazy dog" * 2)
    assert ids.numel() == n and len(m.semantic) == n
    m.eval()
    with torch.no_grad():
        out = m(torch.tensor([m.tokenizer.encode("the quick brown fox")]))
    res = m.semantic.search(out.mem_keys[0, 3:4], 1)
    assert res.scores[0, 0] > 0.99  # the same prefix state was stored during ingest
    text = m.semantic.get_texts(res.ids[0])[0]
    assert text is not None and len(text) == 4
    m.semantic.remove(ids[:5])
    assert len(m.semantic) == n - 5


def test_ingest_keeps_the_tail_of_a_document():
    # a fact's value sits at its end: with a stride that does not divide the length, the last
    # token must still become an item whose text ends with it
    m = small(mem_write_stride=16)
    m.tokenizer = _Tok()
    text = "The capital of Zorbia is Quelt."  # 31 tokens, block 16: items at token 16 and at the end
    enc = m.tokenizer.encode(text)
    ids = m.ingest(text)
    assert ids.numel() == 2  # without the tail item only the first would be written
    tail = enc[16:][-m.mem_text_tokens:]  # the second segment, up to its last token
    assert m.semantic.get_texts(ids[-1:])[0] == m.tokenizer.decode(tail)


@pytest.mark.timeout(120)
def test_fit_checkpoint_roundtrip_keeps_memories(tmp_path):
    from memlm.datamodules.text import TextDataModule
    from memlm.checkpoint import load_module

    dm = TextDataModule(source="builtin", tokenizer="byte", block_size=16, batch_size=4, sampler="stream",
                        max_val_batches=2, cache_dir=str(tmp_path / "cache"), max_chars=200_000)
    dm.prepare_data()
    dm.setup("fit")
    m = small(vocab_size=dm.vocab_size, gate_schedule={**ALL_ON, "verify": 0.5, "expert_bias": 0.5})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2, val_check_interval=4,
                        num_sanity_val_steps=0)
    trainer.fit(m, datamodule=dm)
    assert len(m.semantic) == 4 * 4 * 8 and len(m.episodic) == 16
    path = tmp_path / "hmst.ckpt"
    trainer.save_checkpoint(path)
    m2 = load_module(path)
    assert len(m2.semantic) == len(m.semantic) and len(m2.episodic) == len(m.episodic)
    q = torch.randn(5, 32)
    r1, r2 = m.semantic.search(q, 3), m2.semantic.search(q, 3)
    assert torch.equal(r1.ids, r2.ids)
    torch.testing.assert_close(r1.scores, r2.scores)
    torch.testing.assert_close(r1.values, r2.values)
    assert m.semantic.get_texts(r1.ids[0]) == m2.semantic.get_texts(r2.ids[0])
    assert all(t for t in m2.semantic.get_texts(r2.ids[0]))
    s1, i1 = m.episodic.retrieve(q[0], 2)
    s2, i2 = m2.episodic.retrieve(q[0], 2)
    assert torch.equal(i1, i2)
    # the reloaded model generates with its memories
    toks = list(m2.generate(m2.tokenizer.encode("def "), SamplingParams(4, temperature=0)))
    assert len(toks) == 4
    m.eval()
    x = torch.randint(0, dm.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, m2(x).logits)
    # the ingest CLI grows the checkpoint's memory; the new items are found by their own keys
    from memlm.apps.hmst_ingest import main as ingest_main

    doc = tmp_path / "doc.txt"
    doc.write_text("Quexford is the capital of Zorbania, on the river Plimm.", encoding="utf-8")
    before = len(m2.semantic)
    assert ingest_main(["--ckpt", str(path), "--file", str(doc), "--out", str(tmp_path / "grown.ckpt"), "--stride", "4"]) == 0
    m3 = load_module(tmp_path / "grown.ckpt")
    n_new = len(m2.tokenizer.encode(doc.read_text())) // 4
    assert len(m3.semantic) == before + n_new
    new_ids = m3.semantic.ids()[-n_new:]
    texts = m3.semantic.get_texts(new_ids)
    assert all(t and t in doc.read_text() for t in texts) and texts[-1].endswith("Plimm.")
    with torch.no_grad():
        keys = m3(torch.tensor([m3.tokenizer.encode(doc.read_text())]))
    res = m3.semantic.search(keys.mem_keys[0, 3:4], 1)
    assert int(res.ids[0, 0]) == int(new_ids[0]) and res.scores[0, 0] > 0.99
    with pytest.raises(Exception, match="not found"):
        ingest_main(["--ckpt", str(tmp_path / "missing.ckpt"), "--file", str(doc)])


def test_bf16_autocast_training_and_mixed_exit_batch():
    """The GPU configs train in bf16-mixed: the same code path under CPU autocast."""
    m = small(gate_schedule={"exit": 0.5, "episodic": 1.0, "semantic": 1.0, "verify": 1.0, "expert_bias": 0.5})
    m.log = lambda *a, **k: None
    x = torch.randint(0, 64, (4, 16))
    for i in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m.training_step({"input_ids": x, "targets": torch.roll(x, -1, 1), "first": i == 0}, i)
        assert torch.isfinite(loss)
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.model.blocks[0].moe.parameters() if p.grad is not None)


@pytest.mark.parametrize("index_type", ["ivfpq", "hnsw"])
def test_selectable_index_types_train_and_persist_through_checkpoint_hooks(index_type):
    m = small(mem_index_type=index_type, gate_schedule={**ALL_ON, "verify": 0.0})
    m.log = lambda *a, **k: None
    x = torch.randint(0, 64, (3, 16))
    for i in range(2):
        m.training_step({"input_ids": x, "targets": torch.roll(x, -1, 1), "first": i == 0}, i)
    assert len(m.semantic) == 2 * 3 * 8 and m.semantic.index_type == index_type
    ckpt = {}
    m.on_save_checkpoint(ckpt)
    m2 = small(mem_index_type=index_type)
    m2.on_load_checkpoint(ckpt)
    q = torch.randn(4, 32)
    r1, r2 = m.semantic.search(q, 3), m2.semantic.search(q, 3)
    assert torch.equal(r1.ids, r2.ids)
    torch.testing.assert_close(r1.scores, r2.scores)
    assert len(m2.episodic) == len(m.episodic) == 6
