"""serve.py names the model <run>@step<N> and lists its architecture and size in /v1/models."""
from __future__ import annotations

import shutil

import openai

from memlm.apps.serve import BackgroundServer, build_state, create_app, parse_args
from memlm.checkpoint import served_name
from test_serve import _build_tiny_checkpoint


def test_served_name_from_the_run_layout(tmp_path):
    p = tmp_path / "runs" / "transformer_micro" / "version_3" / "checkpoints" / "last.ckpt"
    assert served_name(p, 300) == "transformer_micro@step300"
    assert served_name(tmp_path / "mine.ckpt", 7) == "mine@step7"


def test_v1_models_carries_the_run_name_step_architecture_and_size(tmp_path):
    src = _build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    ckpt = tmp_path / "runs" / "chatty" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(src, ckpt)
    state = build_state(parse_args(["--ckpt", str(ckpt)]))
    srv = BackgroundServer(create_app(state))
    url = srv.start()
    try:
        (model,) = openai.OpenAI(base_url=url, api_key="x", max_retries=0).models.list().data
    finally:
        srv.stop()
    assert model.id == "chatty@step3"
    extra = model.model_extra
    assert extra["architecture"] == "TransformerLM" and extra["global_step"] == 3
    assert extra["parameters"] == sum(p.numel() for p in state.backend.module.parameters())
    named = build_state(parse_args(["--ckpt", str(ckpt), "--model-name", "mine"]))
    assert named.model_name == "mine"
