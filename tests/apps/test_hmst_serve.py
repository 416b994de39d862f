"""HMST through serve.py: the engine's decisions reach the official openai client in an extra field, and the
ingest / forget / list routes work behind the API key on a real loopback server."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from memlm.core.tokenizer import build_tokenizer
from memlm.lightning_modules.hmst.module import HMSTLanguageModel

API_KEY = "hmst-test-key"


@pytest.fixture(scope="module")
def hmst_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = HMSTLanguageModel(vocab_size=259, block_size=64, n_layer=2, n_head=2, d_model=32, d_ff=32, n_experts=2, top_k=1,
                          exit_layer=1, ssm_d_state=4, ssm_expand=1, mem_top_k=2, mem_query_stride=4, mem_write_stride=4,
                          episodic_capacity=16, controller_hidden=16, critic_d_model=16, critic_layers=1,
                          critic_heads=2, critic_max_len=96)
    m.set_tokenizer(build_tokenizer("byte"))
    with torch.no_grad():  # the greedy controller verifies every answer; the critic rejects everything
        m.model.controller.gate_head.weight.zero_()
        m.model.controller.gate_head.bias.copy_(torch.tensor([-10.0, 10.0, 10.0, 10.0]))
        m.model.critic.head.weight.zero_()
        m.model.critic.head.bias.fill_(-5.0)
    m.ingest("The capital of Zorbia is Quelt.")
    ckpt = {"state_dict": m.state_dict(), "global_step": 0, "hyper_parameters": dict(m.hparams)}
    m.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("hmst") / "last.ckpt"
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def server(hmst_ckpt):
    from memlm.apps.serve import BackgroundServer, build_state, create_app, parse_args

    state = build_state(parse_args(["--ckpt", hmst_ckpt, "--api-key", API_KEY, "--hmst-threshold", "0.5"]))
    assert state.engine is not None  # an HMST checkpoint is served through the engine
    srv = BackgroundServer(create_app(state))
    url = srv.start()
    yield url
    srv.stop()


def test_chat_completion_carries_the_engine_decisions(server):
    client = openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=120)
    resp = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of Zorbia?"}])
    hmst = resp.model_extra["hmst"]
    # verify fired, the critic said no twice (first try + one retry), so the model abstained honestly
    assert hmst["abstained"] is True and resp.choices[0].message.content == hmst["text"]
    assert len(hmst["attempts"]) == 2 and all(a["verified"] and a["gates"]["verify"] for a in hmst["attempts"])
    assert hmst["compute"]["counts"]["critic_calls"] == 2 and hmst["latency_s"] > 0
    assert hmst["attempts"][0]["retrieved"] and {"id", "score", "text"} <= set(hmst["attempts"][0]["retrieved"][0])


def test_streamed_chat_is_the_engine_answer_with_its_decisions_on_the_last_chunk(server):
    """A streamed HMST chat goes through the engine as well: the streamed text is the engine's
    (here its honest abstention) and the final chunk carries the same decisions object."""
    client = openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(
        model=client.models.list().data[0].id, max_tokens=4, temperature=0, stream=True,
        messages=[{"role": "user", "content": "What is the capital of Zorbia?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    carried = [c.model_extra["hmst"] for c in chunks if (c.model_extra or {}).get("hmst")]
    assert len(carried) == 1 and chunks[-1].model_extra.get("hmst") == carried[0]
    hmst = carried[0]
    assert hmst["abstained"] is True and text == hmst["text"] and text.strip()
    assert hmst["compute"]["counts"]["critic_calls"] == 2 and len(hmst["attempts"]) == 2
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_memory_routes_work_behind_the_api_key(server):
    base = server.rstrip("/")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=120) as http:
        assert http.get(f"{base}/hmst/memory").status_code == 401
        n0 = len(http.get(f"{base}/hmst/memory", headers=auth).json()["items"])
        ids = http.post(f"{base}/hmst/ingest", headers=auth, json={"text": "Mekal leads Brandor."}).json()["ids"]
        items = http.get(f"{base}/hmst/memory", headers=auth).json()["items"]
        assert ids and len(items) == n0 + len(ids) and {i["id"] for i in items} >= set(ids)
        assert http.post(f"{base}/hmst/forget", headers=auth, json={"ids": ids}).json() == {"removed": len(ids)}
        assert len(http.get(f"{base}/hmst/memory", headers=auth).json()["items"]) == n0
        assert http.post(f"{base}/hmst/ingest", headers=auth, json={"text": ""}).status_code == 400
        assert http.post(f"{base}/hmst/forget", headers=auth, json={"ids": ["x"]}).status_code == 400
