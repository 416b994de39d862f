"""Bad input gets one clear line: ``error: ...`` on stderr, no traceback, a non-zero exit, nothing lost.

A few cases go through ``python train.py`` as real subprocesses (started together, in parallel,
because importing Lightning costs seconds); the rest run the same ``run_main(MemLMCLI)`` path
in-process and check the same contract on the captured stderr.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from memlm.checkpoint import load_module, read_checkpoint
from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI
from memlm.core.errors import MemLMError, format_error, run_main
from memlm.core.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "transformer_micro.yaml"
TINY = [
    "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
    "--model.init_args.block_size=32", "--data.init_args.tokenizer=char", "--data.init_args.block_size=32",
    "--data.init_args.batch_size=4", "--data.init_args.max_val_batches=1",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]


def assert_one_error_line(rc, stderr: str, match: str) -> str:
    assert rc not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    assert match in lines[0], lines[0]
    return lines[0]


# -- real subprocesses ------------------------------------------------------------------------
def _train_cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(CONFIG), "--run.root", str(root),
            "--run.logger=[csv]", *TINY, *extra]


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory, memlm_cache):
    """Start every subprocess case at once; each test then waits for its own."""
    root = tmp_path_factory.mktemp("err-runs")
    cases = {
        "class_path": _train_cmd(root, "--model.class_path=memlm.lightning_modules.transformer.NoSuchLM"),
        # a huge learning rate after a short warmup: a checkpoint every step, then the loss explodes
        "nan_loss": _train_cmd(root, "--run.name=nan", "--run.ckpt_every_n_steps=1", "--model.init_args.optimizer.learning_rate=1e6",
                               "--model.init_args.optimizer.warmup_steps=3", "--trainer.gradient_clip_val=null",
                               "--trainer.max_steps=30", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1"),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEMLM_QUIET": "1"}
    env.pop("MEMLM_DEBUG", None)
    env.pop(RUN_DIR_ENV, None)
    procs = {k: subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, cmd in cases.items()}
    results = {}
    try:
        for k, p in procs.items():
            out, err = p.communicate(timeout=300)
            results[k] = (p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return root, results


@pytest.mark.slow  # two train.py processes started together (Lightning import dominates)
def test_subprocess_wrong_class_path(subprocess_runs):
    _, res = subprocess_runs
    rc, out, err = res["class_path"]
    line = assert_one_error_line(rc, err, "NoSuchLM")
    assert "usage:" not in err and "usage:" not in out  # no 60-line usage block
    assert "class_path" in line


@pytest.mark.slow  # two train.py processes started together (Lightning import dominates)
def test_subprocess_nan_loss_keeps_last_good_checkpoint(subprocess_runs):
    root, res = subprocess_runs
    rc, _, err = res["nan_loss"]
    line = assert_one_error_line(rc, err, "loss became non-finite at global step")
    bad_step = int(line.split("global step ")[1].split(";")[0])
    last = root / "nan" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file(), "the last good checkpoint must survive"
    ckpt = read_checkpoint(last)
    assert 1 <= ckpt["global_step"] <= bad_step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    module = load_module(last)  # and it is usable
    assert len(list(module.generate([1, 2], SamplingParams(3, temperature=0)))) >= 1


# -- the same contract in-process -----------------------------------------------------------------
def train_inprocess(capsys, root: Path, *extra: str, tiny: bool = True) -> tuple[int, str]:
    argv = ["fit", "--config", str(CONFIG), "--run.root", str(root), "--run.logger=[csv]", *(TINY if tiny else []), *extra]
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as info:
            run_main(lambda: MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv))
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    return info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, memlm_cache) -> Path:
    root = tmp_path_factory.mktemp("good")
    try:
        cli = MemLMCLI(L.LightningModule, L.LightningDataModule, args=[
            "fit", "--config", str(CONFIG), "--run.root", str(root), "--run.logger=[none]", *TINY,
            "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    return cli.run_dir / "checkpoints" / "last.ckpt"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "name, args, match",
    [
        ("missing file", lambda d: ["--data.init_args.source=files", f"--data.init_args.files=[{d / 'nope.txt'}]"],
         "data file not found"),
        ("empty file", lambda d: ["--data.init_args.source=files", f"--data.init_args.files=[{_write(d / 'e.txt', b'')}]"],
         "is empty"),
        ("undecodable", lambda d: ["--data.init_args.source=files",
                                   f"--data.init_args.files=[{_write(d / 'bin.txt', bytes(range(128, 256)) * 4)}]"],
         "is not valid UTF-8"),
        ("missing data_dir", lambda d: ["--data.init_args.source=files", f"--data.init_args.data_dir={d / 'none'}"],
         "data_dir not found"),
        ("unknown dataset offline", lambda d: ["--data.init_args.source=hf", "--data.init_args.dataset_name=no_such_ds_xyz"],
         "--data.data_dir"),
        ("block size too long", lambda d: ["--data.init_args.block_size=64"], "longer than the model supports (32)"),
        ("missing checkpoint", lambda d: [f"--ckpt_path={d / 'none.ckpt'}"], "checkpoint not found"),
        ("corrupt checkpoint", lambda d: [f"--ckpt_path={_write(d / 'bad.ckpt', b'not a checkpoint')}"],
         "corrupt or not a MemLM"),
        ("nothing to resume", lambda d: ["--ckpt_path=last", "--run.name=fresh"], "nothing to resume"),
        ("bad option value", lambda d: ["--trainer.max_steps=many"], "trainer.max_steps"),
        ("unknown option", lambda d: ["--model.init_args.n_layerz=2"], "n_layerz"),
        ("unknown logger", lambda d: ["--run.logger=[mlflow]", "--trainer.max_steps=1"], "unknown --run.logger"),
        ("bad tokenizer", lambda d: ["--data.init_args.tokenizer=wordpiece"], "unknown tokenizer"),
    ],
)
def test_user_errors_are_one_line(name, args, match, tmp_path, capsys, memlm_cache):
    t0 = time.perf_counter()
    rc, err = train_inprocess(capsys, tmp_path, *args(tmp_path))
    assert rc == 2
    assert_one_error_line(rc, err, match)
    assert time.perf_counter() - t0 < 60, name  # offline dataset names fail in seconds, no retries


def test_checkpoint_tokenizer_mismatch(good_ckpt, tmp_path, capsys):
    rc, err = train_inprocess(capsys, tmp_path, f"--ckpt_path={good_ckpt}", "--data.init_args.tokenizer=byte",
                              "--trainer.max_steps=2")
    assert_one_error_line(rc, err, "tokenizer differs from the checkpoint's tokenizer")


def test_checkpoint_of_another_model_class(good_ckpt, tmp_path):
    ckpt = torch.load(good_ckpt, weights_only=True)
    ckpt["memlm"]["class_path"] = "memlm.lightning_modules.transformer.NoSuchLM"
    bad = tmp_path / "other.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(MemLMError, match="cannot be imported") as info:
        load_module(bad)
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(MemLMError, match="not written by MemLM"):
        load_module(foreign)
    with pytest.raises(MemLMError, match="not a Lightning checkpoint"):
        torch.save({"weights": torch.zeros(2)}, foreign)
        load_module(foreign)


def test_checkpoint_cli_tool(good_ckpt, tmp_path, capsys):
    from memlm import checkpoint as ck

    out = tmp_path / "tok.json"
    for argv in (["info", str(good_ckpt)], ["export-tokenizer", str(good_ckpt), str(out)]):
        sys_argv, sys.argv = sys.argv, ["memlm.checkpoint", *argv]
        try:
            with pytest.raises(SystemExit) as info:
                run_main(ck._main)
        finally:
            sys.argv = sys_argv
        assert info.value.code == 0
    assert "memlm.lightning_modules.transformer.TransformerLM" in capsys.readouterr().out
    from memlm.core.tokenizer import TextTokenizer

    assert TextTokenizer.load(out).fingerprint() == load_module(good_ckpt).tokenizer.fingerprint()


def test_run_main_contract(capsys, monkeypatch):
    def boom():
        raise MemLMError("something is wrong\nsecond line; do this")

    with pytest.raises(SystemExit) as info:
        run_main(boom)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: something is wrong\n"
    with pytest.raises(SystemExit) as info:
        run_main(lambda: open("/definitely/not/here.txt"))
    assert info.value.code == 2 and capsys.readouterr().err.startswith("error: ")
    assert "x.txt" in format_error(FileNotFoundError(2, "No such file", "x.txt"))
    with pytest.raises(SystemExit) as info:
        run_main(lambda: 3)
    assert info.value.code == 3
    monkeypatch.setenv("MEMLM_DEBUG", "1")  # debugging keeps the traceback
    with pytest.raises(MemLMError):
        run_main(boom)
    assert math.isfinite(1.0)


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from memlm.lightning_modules.transformer import TransformerLM

    m = TransformerLM(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    assert ckpt["memlm"]["class_path"] == "memlm.lightning_modules.transformer.TransformerLM"
    with torch.no_grad():
        m.model.blocks[0].mlp.fc.weight[0, 0] = float("nan")
    with pytest.raises(MemLMError, match="weights became non-finite .*mlp.fc.weight"):
        m.on_save_checkpoint({})
