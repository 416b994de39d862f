"""HMSTInferenceEngine: verify fires -> critic called -> abstain or regenerate; decisions, meter, memory ops."""
from __future__ import annotations

import pytest
import torch

from memlm.apps.hmst_engine import EngineConfig, HMSTInferenceEngine
from memlm.core.errors import MemLMError
from memlm.core.tokenizer import build_tokenizer
from memlm.lightning_modules.hmst.module import HMSTLanguageModel

FACTS = ["The capital of Zorbia is Quelt.", "The leader of Brandor is Mekal.", "Tivon is 42 years old."]


def hmst_module():
    torch.manual_seed(0)
    m = HMSTLanguageModel(vocab_size=259, block_size=64, n_layer=2, n_head=2, d_model=32, d_ff=32, n_experts=2, top_k=1,
                          exit_layer=1, ssm_d_state=4, ssm_expand=1, mem_top_k=2, mem_query_stride=4, mem_write_stride=4,
                          episodic_capacity=16, controller_hidden=16, critic_d_model=16, critic_layers=1,
                          critic_heads=2, critic_max_len=96)
    m.set_tokenizer(build_tokenizer("byte"))
    for f in FACTS:
        m.ingest(f)
    return m.eval()


def set_policy(m, verify: float = 10.0, exit: float = -10.0):
    """A controller whose greedy decision is known: logits from the biases only."""
    ctl = m.model.controller
    with torch.no_grad():
        ctl.gate_head.weight.zero_()
        ctl.gate_head.bias.copy_(torch.tensor([exit, 10.0, 10.0, verify]))


def set_critic(m, logit: float):
    with torch.no_grad():
        m.model.critic.head.weight.zero_()
        m.model.critic.head.bias.fill_(logit)


def test_verify_fires_critic_below_threshold_retries_then_abstains():
    m = hmst_module()
    set_policy(m, verify=10.0)
    set_critic(m, -5.0)  # P(correct) = 0.0067 for any answer
    eng = HMSTInferenceEngine(m, EngineConfig(verify="gate", threshold=0.5, max_retries=1, retrieve_k=2, max_new_tokens=4))
    res = eng.answer("Q: What is the capital of Zorbia?\nA:")
    assert res.abstained and res.text == eng.cfg.abstain_message
    assert len(res.attempts) == 2 and all(a.verified and not a.accepted for a in res.attempts)
    assert res.attempts[0].critic_score == pytest.approx(torch.sigmoid(torch.tensor(-5.0)).item(), abs=1e-5)
    assert res.compute["counts"]["critic_calls"] == 2  # every critic call is metered
    # the retry retrieved twice as much, with the semantic read forced on
    assert len(res.attempts[1].retrieved) == 2 * len(res.attempts[0].retrieved)
    assert res.attempts[1].gates["semantic"] and not res.attempts[1].gates["exit"]
    assert all({"id", "score", "text"} <= set(r) for r in res.attempts[0].retrieved)
    assert res.compute["total"] > 0 and res.latency_s > 0
    assert m.model.cfg.mem_top_k == 2  # the wider retrieval of the retry is undone


def test_critic_above_threshold_accepts_the_first_answer():
    m = hmst_module()
    set_policy(m, verify=10.0)
    set_critic(m, 5.0)
    res = HMSTInferenceEngine(m, EngineConfig(max_new_tokens=4)).answer("Q: How old is Tivon?\nA:")
    assert not res.abstained and len(res.attempts) == 1 and res.attempts[0].accepted
    assert res.text == res.attempts[0].answer and res.compute["counts"]["critic_calls"] == 1
    d = res.to_dict()
    assert d["attempts"][0]["gates"]["verify"] is True and d["critic_score"] == res.attempts[0].critic_score


def test_verify_gate_off_means_no_critic_call_and_regenerate_path(monkeypatch):
    m = hmst_module()
    set_policy(m, verify=-10.0)
    set_critic(m, -5.0)
    res = HMSTInferenceEngine(m, EngineConfig(verify="gate", max_new_tokens=4)).answer("Q: Who leads Brandor?\nA:")
    assert not res.attempts[0].verified and res.attempts[0].critic_score is None and not res.abstained
    assert res.compute["counts"].get("critic_calls", 0) == 0
    # verify: always overrides the gate; a low first score and a high second one regenerates once
    eng = HMSTInferenceEngine(m, EngineConfig(verify="always", max_retries=2, max_new_tokens=4))
    scores = iter([0.2, 0.9])
    monkeypatch.setattr(eng, "score", lambda *a, **k: next(scores))
    res = eng.answer("Q: Who leads Brandor?\nA:")
    assert [a.accepted for a in res.attempts] == [False, True] and not res.abstained
    assert res.text == res.attempts[1].answer


def test_gate_modes_decide_compute():
    m = hmst_module()
    set_policy(m, verify=-10.0, exit=10.0)  # the controller exits early and skips verification
    q = "Q: What is the capital of Zorbia?\nA:"
    ctl = HMSTInferenceEngine(m, EngineConfig(gate_mode="controller", max_new_tokens=4)).answer(q)
    on = HMSTInferenceEngine(m, EngineConfig(gate_mode="all_on", max_new_tokens=4)).answer(q)
    assert ctl.attempts[0].gates["exit"] and not on.attempts[0].gates["exit"] and on.attempts[0].verified
    assert ctl.compute_total < on.compute_total


@pytest.mark.parametrize("evidence", ["draft", "prompt"])
def test_the_critic_checks_the_draft_against_evidence_found_from_its_end(monkeypatch, evidence):
    """verify -> memory searched with the key at the draft's last token (not the prompt's) ->
    the critic reads those texts (the prompt's items only without evidence); every search is metered."""
    m = hmst_module()
    set_policy(m, verify=10.0)
    set_critic(m, 5.0)
    eng = HMSTInferenceEngine(m, EngineConfig(verify="gate", max_new_tokens=4, retrieve_k=1, evidence=evidence))
    keys, last_keys, critic_facts = [], [], []
    search, forward, critic = eng._retrieve, eng._forward, m.model.critic.forward
    monkeypatch.setattr(eng, "_retrieve", lambda key, k, meter: keys.append(key.clone()) or search(key, k, meter))

    def spy_forward(*a, **kw):
        out = forward(*a, **kw)
        last_keys.append(out.mem_keys[0, -1].clone())
        return out

    monkeypatch.setattr(eng, "_forward", spy_forward)
    monkeypatch.setattr(m.model.critic, "forward", lambda q, r, f, pad_id=None: critic_facts.append(f) or critic(q, r, f, pad_id))
    res = eng.answer("Q: What is the capital of Zorbia?\nA:")
    a = res.attempts[0]
    assert a.verified and a.accepted  # (critic_facts[1:] are the critic's cost measurement)
    facts_text = eng.tok.decode([t for t in critic_facts[0][0].tolist() if t != eng.pad])
    if evidence == "prompt":
        assert len(keys) == 1 and a.evidence == []
        assert facts_text == a.retrieved[0]["text"]
        return
    prompt_key, draft_keys = keys[0], torch.stack(last_keys[1:])  # the prefill's, then each draft token's
    assert len(keys) == 1  # the evidence search does not go through the prompt's retrieval
    # the evidence: the best item of each word-end key of the draft, distinct, in order
    ends = [i for i, ch in enumerate(a.answer) if i == len(a.answer) - 1 or not a.answer[i + 1].isalnum()]
    assert len(a.answer) == len(draft_keys) and ends  # byte tokens: one key per character
    found = m.semantic.search(draft_keys[ends].float(), 1).ids[:, 0].tolist()
    assert [e["id"] for e in a.evidence] == list(dict.fromkeys(found))
    assert torch.equal(last_keys[0], prompt_key) and not torch.equal(draft_keys[-1], prompt_key)
    texts = list(dict.fromkeys(e["text"] for e in a.evidence))  # the evidence alone
    assert facts_text == " ".join(texts)
    # the evidence search is metered: one FAISS query per word end of the draft more than without it
    plain = HMSTInferenceEngine(m, EngineConfig(verify="gate", max_new_tokens=4, retrieve_k=1, evidence="prompt"))
    without = plain.answer("Q: What is the capital of Zorbia?\nA:").compute["counts"]["faiss_queries"]
    assert res.compute["counts"]["faiss_queries"] == without + len(ends)


def test_memory_operations_and_errors():
    m = hmst_module()
    eng = HMSTInferenceEngine(m)
    before = eng.list()
    ids = eng.ingest("Quelt is a city of glass.")
    assert ids and len(eng.list()) == len(before) + len(ids)
    assert {i["id"] for i in eng.list()} >= set(ids)
    assert eng.forget(ids) == len(ids) and len(eng.list()) == len(before)
    with pytest.raises(MemLMError):
        EngineConfig(gate_mode="random")
    with pytest.raises(MemLMError):
        EngineConfig(threshold=2.0)
    with pytest.raises(MemLMError):
        EngineConfig(evidence="web")
    with pytest.raises(MemLMError):
        eng.answer("")


def test_chat_explain_prints_the_decisions_and_memory_commands(tmp_path):
    import io
    from types import SimpleNamespace

    from memlm.apps.chat import Chat
    from memlm.apps.chat_backends import LocalBackend

    m = hmst_module()
    set_policy(m, verify=10.0)
    set_critic(m, 5.0)
    args = SimpleNamespace(system=None, max_new_tokens=4, temperature=0.0, top_k=None, top_p=None, seed=None,
                           explain=True, memory=None, learn=False, log=None)
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(args, LocalBackend(m, name="hmst"), out=out, err=err)
    assert chat.engine is not None
    chat.turn("What is the capital of Zorbia?")
    log = err.getvalue()
    assert "[hmst] attempt 1: gates on:" in log and "verify" in log and "critic" in log and "retrieved #" in log
    assert "FAISS queries" in log and "latency" in log
    n = len(m.semantic)
    chat.turn("/ingest Quelt is a city of glass.")
    assert len(m.semantic) > n and "ingested ids" in out.getvalue()
    chat.turn("/memory 3")
    assert out.getvalue().count("#") >= 3
    with pytest.raises(MemLMError):
        chat.turn("/forget x")


def test_chat_py_prompt_without_a_template_answers_through_the_engine(tmp_path, capsys):
    """``chat.py --prompt ... --template none`` (the plain streaming path for other models) gives an
    HMST checkpoint the engine's answer and, with --explain, its decisions."""
    from memlm.apps.chat import main

    m = hmst_module()
    set_policy(m, verify=10.0)
    set_critic(m, -5.0)  # rejects every draft: the engine abstains, the plain generator never would
    ckpt = {"state_dict": m.state_dict(), "global_step": 0, "hyper_parameters": dict(m.hparams)}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "hmst.ckpt")
    main(["--ckpt", str(tmp_path / "hmst.ckpt"), "--prompt", "What is the capital of Zorbia?", "--template", "none",
          "--temperature", "0", "--max-new-tokens", "4", "--explain"])
    out, err = capsys.readouterr()
    res = HMSTInferenceEngine(m, EngineConfig(max_new_tokens=4)).answer("What is the capital of Zorbia?",
                                                                        query="What is the capital of Zorbia?")
    assert res.abstained and out.strip() == res.text.strip()
    assert "[hmst] attempt 1: gates on:" in err and "critic" in err
