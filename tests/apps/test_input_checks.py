"""Bad values are stopped where they enter: one ``error:`` line and exit 2 from train.py and chat.py,
HTTP 400 with an OpenAI-style error from serve.py, a MemLMError from every module and datamodule.

The train.py cases are real subprocesses started together (importing Lightning costs seconds
each); they must fail before any training, so no checkpoint may appear.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from memlm.core.errors import MemLMError, run_main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
FAST = ["--run.logger=[none]", "--data.init_args.tokenizer=char", "--trainer.enable_progress_bar=false"]

# case -> (config, bad override, what the one error line must say); one per path a value enters by
# (datamodule, linked vocab size, trainer, module); the other values are checked in-process below
CLI_CASES = {
    "batch_size": ("transformer_micro", "--data.init_args.batch_size=0", "data.batch_size must be >= 1, got 0"),
    "vocab_size": ("transformer_micro", "--data.init_args.vocab_size=0", "data.vocab_size must be >= 1"),
    "max_steps_0": ("transformer_micro", "--trainer.max_steps=0", "trainer.max_steps must be >= 1, or -1 for no limit, got 0"),
    "max_steps_neg": ("transformer_micro", "--trainer.max_steps=-5", "trainer.max_steps must be >= 1, or -1 for no limit, got -5"),
    "n_layer": ("transformer_micro", "--model.init_args.n_layer=0", "model.n_layer must be >= 1, got 0"),
    "n_embd": ("transformer_micro", "--model.init_args.n_embd=0", "model.n_embd must be >= 1, got 0"),
    "model_block_size": ("transformer_micro", "--model.init_args.block_size=0", "model.block_size must be >= 1"),
    "n_head_split": ("transformer_micro", "--model.init_args.n_head=3",
                     "model.n_embd (128) must be divisible by model.n_head (3)"),
    "hmst_n_head": ("hmst_micro", "--model.init_args.n_head=3", "model.d_model (128) must be divisible by model.n_head (3)"),
    "hamt_n_embd": ("hamt_micro", "--model.init_args.n_embd=0", "model.n_embd must be >= 1, got 0"),
}


def one_error_line(rc, stderr: str) -> str:
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.strip().splitlines()[-1] == errors[0], stderr  # nothing follows the error
    return errors[0]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, memlm_cache):
    root = tmp_path_factory.mktemp("input-checks")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEMLM_QUIET": "1"}
    env.pop("MEMLM_DEBUG", None)
    env.pop("MEMLM_RUN_DIR", None)

    def run(name: str):
        config, bad, _ = CLI_CASES[name]
        cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(CONFIGS / f"{config}.yaml"),
               "--run.root", str(root), f"--run.name={name}", *FAST, bad]
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        return name, (p.returncode, p.stdout, p.stderr)

    with ThreadPoolExecutor(max_workers=4) as pool:  # a few at a time on a small machine
        results = dict(pool.map(run, CLI_CASES))
    return root, results


@pytest.mark.slow  # 10 train.py processes (the Lightning import dominates each)
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_train_cli_rejects_bad_value_before_training(cli_results, case):
    root, results = cli_results
    rc, out, err = results[case]
    line = one_error_line(rc, err)
    assert CLI_CASES[case][2] in line, line
    assert not list((root / case).rglob("*.ckpt")), "nothing may be trained or saved"
    assert "Epoch" not in out and "Epoch" not in err


# -- the same checks without the CLI ---------------------------------------------------------------
def test_trainer_limits_accept_minus_one_and_unset():
    from memlm.apps.cli import _check_trainer_limits

    for ok in ({"max_steps": -1, "max_epochs": None}, {"max_steps": 1, "max_epochs": -1}, {}):
        _check_trainer_limits(ok)
    with pytest.raises(MemLMError, match="trainer.max_epochs must be >= 1, or -1 for no limit, got -2"):
        _check_trainer_limits({"max_steps": -1, "max_epochs": -2})


@pytest.mark.parametrize("kw, message", [
    (dict(vocab_size=0), "model.vocab_size must be >= 1, got 0"),
    (dict(n_layer=0), "model.n_layer must be >= 1, got 0"),
    (dict(block_size=-4), "model.block_size must be >= 1, got -4"),
    (dict(n_embd=0), "model.n_embd must be >= 1, got 0"),
    (dict(n_head=0), "model.n_head must be >= 1, got 0"),
    (dict(n_embd=48, n_head=5), "model.n_embd (48) must be divisible by model.n_head (5)"),
    (dict(n_embd=30, n_head=6), "with an even head size"),  # heads of 5: rotary embeddings rotate pairs
])
def test_transformer_sizes(kw, message):
    from memlm.lightning_modules.transformer import TransformerLM

    with pytest.raises(MemLMError) as info:
        TransformerLM(**{**dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), **kw})
    assert message in str(info.value) and "\n" not in str(info.value)
    TransformerLM(vocab_size=11, block_size=8, n_layer=1, n_head=6, n_embd=36)  # heads of 6 are fine


def test_head_split_error_suggests_a_head_count_that_fits():
    from memlm.lightning_modules.transformer import TransformerLM

    with pytest.raises(MemLMError, match=r"e\.g\. model\.n_head=4$"):
        TransformerLM(vocab_size=11, block_size=8, n_layer=1, n_head=5, n_embd=48)


HMST_SMALL = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=32, n_experts=4, top_k=2,
                  exit_layer=1, ssm_d_state=4, ssm_expand=1, critic_d_model=16, critic_layers=1, critic_heads=2,
                  critic_max_len=32, controller_hidden=8, episodic_capacity=8)


@pytest.mark.parametrize("kw, message", [
    (dict(n_head=3), "model.d_model (32) must be divisible by model.n_head (3)"),
    (dict(n_head=0), "model.n_head must be >= 1, got 0"),
    (dict(d_model=0), "model.d_model must be >= 1, got 0"),
    (dict(n_layer=0), "model.n_layer must be >= 1, got 0"),
    (dict(block_size=0), "model.block_size must be >= 1, got 0"),
    (dict(n_experts=0), "model.n_experts must be >= 1, got 0"),
    (dict(top_k=5), "model.top_k must be in [1, model.n_experts=4], got 5"),
    (dict(critic_heads=3), "model.critic_d_model (16) must be divisible by model.critic_heads (3)"),
])
def test_hmst_sizes(kw, message):
    from memlm.lightning_modules.hmst.module import HMSTLanguageModel

    with pytest.raises(MemLMError) as info:
        HMSTLanguageModel(**{**HMST_SMALL, **kw})
    assert message in str(info.value)


@pytest.mark.parametrize("kw, message", [
    (dict(n_layer=0), "model.n_layer must be >= 1, got 0"),
    (dict(n_embd=0), "model.n_embd must be >= 1, got 0"),
    (dict(n_slots=0), "model.n_slots must be >= 1, got 0"),
    (dict(vocab_size=0), "model.vocab_size must be >= 1, got 0"),
])
def test_hamt_sizes(kw, message):
    from memlm.lightning_modules.hamt.module import HAMTLanguageModel

    with pytest.raises(MemLMError, match=message.replace(".", r"\.")):
        HAMTLanguageModel(**{**dict(vocab_size=11, n_layer=1, n_embd=16, n_slots=2), **kw})


def test_htm_sizes():
    from memlm.lightning_modules.htm.module import HTMLanguageModel

    with pytest.raises(MemLMError, match=r"model\.columns must be >= 1, got 0"):
        HTMLanguageModel(vocab_size=11, columns=0)


@pytest.mark.parametrize("kw, message", [
    (dict(batch_size=0), "data.batch_size must be >= 1, got 0"),
    (dict(block_size=0), "data.block_size must be >= 1, got 0"),
    (dict(vocab_size=-1), "data.vocab_size must be >= 1, got -1"),
    (dict(steps_per_epoch=0), "data.steps_per_epoch must be >= 1, got 0"),
])
def test_text_datamodule_sizes(kw, message):
    from memlm.datamodules.text import TextDataModule

    with pytest.raises(MemLMError, match=message.replace(".", r"\.")):
        TextDataModule(**kw)


def test_recall_and_conversation_datamodule_sizes():
    from memlm.datamodules.conversation import ConversationDataModule
    from memlm.datamodules.recall import RecallDataModule

    with pytest.raises(MemLMError, match=r"data\.batch_size must be >= 1, got 0"):
        RecallDataModule(batch_size=0)
    with pytest.raises(MemLMError, match=r"data\.stream_chunk must be >= 1, got 0"):  # was a ZeroDivisionError
        RecallDataModule(stream_chunk=0)
    with pytest.raises(MemLMError, match=r"data\.eval_lengths must be >= 1, got 0"):
        RecallDataModule(eval_lengths=[128, 0])
    with pytest.raises(MemLMError, match=r"data\.batch_size must be >= 1, got 0"):
        ConversationDataModule(batch_size=0)


# -- chat.py ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-0.5", "--temperature must be >= 0 (0 = greedy), got -0.5"),
    ("--top-p", "0", "--top-p must be in (0, 1] (1 = off), got 0.0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1] (1 = off), got 1.5"),
    ("--top-k", "-1", "--top-k must be >= 0 (0 = off), got -1"),
])
def test_chat_rejects_bad_sampling_flags_with_one_line(capsys, tmp_path, flag, value, message):
    from memlm.apps import chat

    missing = tmp_path / "never-loaded.ckpt"  # the check comes before any checkpoint is read
    with pytest.raises(SystemExit) as info:
        run_main(lambda: chat.main(["--ckpt", str(missing), "--prompt", "hi", flag, value]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}", err


def test_chat_accepts_the_boundaries():
    from memlm.apps import chat

    args = chat.parse_args(["--ckpt", "x.ckpt", "--temperature", "0", "--top-k", "0", "--top-p", "1"])
    assert (args.temperature, args.top_k, args.top_p) == (0.0, 0, 1.0)


def test_chat_subprocess_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MEMLM_DEBUG", None)
    p = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--ckpt", str(tmp_path / "x.ckpt"), "--prompt", "hi",
                        "--top-p", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert one_error_line(p.returncode, p.stderr) == "error: --top-p must be in (0, 1] (1 = off), got 2.0"


# -- serve.py --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api():
    """serve.py's app over an untrained one-layer model: enough to reach and pass the checks."""
    import torch
    from fastapi.testclient import TestClient

    from memlm.apps.chat_backends import LocalBackend
    from memlm.apps.serve import ServerState, create_app
    from memlm.core.tokenizer import build_tokenizer
    from memlm.lightning_modules.transformer import TransformerLM

    torch.manual_seed(0)
    tok = build_tokenizer("byte")
    module = TransformerLM(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    module.set_tokenizer(tok)
    state = ServerState(LocalBackend(module, name="tiny"), "tiny", max_tokens_cap=16, default_max_tokens=4)
    with TestClient(create_app(state)) as client:
        yield client


BAD_BODIES = [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.2}, "top_p"),
    ({"top_k": -1}, "top_k"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra, param", BAD_BODIES)
def test_serve_answers_bad_sampling_values_with_400(api, extra, param, stream):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream, **extra}
    text = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": stream, **extra}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", text)):
        r = api.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] == "invalid_value"
        assert param in err["message"] and "\n" not in err["message"]


def test_serve_accepts_the_boundaries(api):
    # top_k 0 and top_p 1 mean "off", temperature 0 is greedy: all valid, as in SamplingParams
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0, "top_k": 0, "top_p": 1}
    r = api.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    r = api.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 3, "temperature": 0.5, "top_p": 1e-6, "seed": 1})
    assert r.status_code == 200, r.text
