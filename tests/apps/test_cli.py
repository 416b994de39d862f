"""MemLMCLI in-process: run directories, loggers, metric names, linked vocab, checkpoints, micro configs."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from memlm.checkpoint import load_module
from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI
from memlm.core.errors import MemLMError
from memlm.core.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "transformer_micro.yaml"
TINY = [
    "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
    "--model.init_args.block_size=32", "--model.init_args.optimizer.warmup_steps=2",
    "--data.init_args.tokenizer=char", "--data.init_args.block_size=32", "--data.init_args.batch_size=4",
    "--data.init_args.max_val_batches=1",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]


def run_cli(root: Path, *args: str, config: Path = CONFIG, logger: str = "[csv]", tiny: bool = True) -> MemLMCLI:
    argv = ["fit", "--config", str(config), "--run.root", str(root), f"--run.logger={logger}"]
    argv += (TINY if tiny else []) + list(args)
    try:
        return MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, memlm_cache):
    """10 steps, validation every 5, every step logged: shared by the checks below."""
    root = tmp_path_factory.mktemp("runs")
    cli = run_cli(root, "--run.name=tiny", "--trainer.max_steps=10", "--trainer.val_check_interval=5",
                  "--trainer.log_every_n_steps=1", "--trainer.callbacks+=memlm.callbacks.throughput.TokenThroughput",
                  "--trainer.callbacks.window=2")
    return cli


def test_run_directory_layout(tiny_run):
    run_dir = tiny_run.run_dir
    assert run_dir == Path(tiny_run.trainer.default_root_dir)
    assert run_dir.parent.name == "tiny" and run_dir.name == "version_0"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.csv").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-step=") for n in ckpts)
    assert tiny_run.trainer.global_step == 10


def test_metric_names_follow_conventions(tiny_run):
    rows = read_metrics(tiny_run.run_dir)
    cols = set(rows[0])
    for key in ("train/loss", "val/loss", "val/ppl", "val/bpb", "val/acc", "train/tokens_per_sec", "train/mfu"):
        assert key in cols, f"{key} missing from metrics.csv columns {sorted(cols)}"
    train = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(train) == 10 and all(0 < v < 10 for v in train)
    val = [r for r in rows if r["val/loss"]]
    assert len(val) == 2
    for r in val:
        loss, ppl, bpb = float(r["val/loss"]), float(r["val/ppl"]), float(r["val/bpb"])
        assert ppl == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)
        assert 0.5 * loss / math.log(2) < bpb <= loss / math.log(2) * (1 + 1e-5)  # char tokens: 1-2 bytes each
        assert 0 <= float(r["val/acc"]) <= 1
    assert all(float(r["train/tokens_per_sec"]) > 0 for r in rows if r["train/tokens_per_sec"])


def test_vocab_size_is_linked_from_datamodule(tiny_run):
    dm, model = tiny_run.datamodule, tiny_run.model
    # the YAML asks for a 2048 BPE vocabulary; the char tokenizer decides the real size
    assert dm.vocab_size == dm.tokenizer.vocab_size < 2048
    assert model.vocab_size == dm.vocab_size == model.model.wte.num_embeddings
    saved = yaml.safe_load((tiny_run.run_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "memlm.lightning_modules.transformer.TransformerLM"
    assert model.tokenizer.fingerprint() == dm.tokenizer.fingerprint()


def test_load_module_rebuilds_model_with_tokenizer(tiny_run):
    path = tiny_run.run_dir / "checkpoints" / "last.ckpt"
    module = load_module(path)
    assert type(module).__name__ == "TransformerLM" and not module.training
    assert module.tokenizer.fingerprint() == tiny_run.datamodule.tokenizer.fingerprint()
    for k, v in tiny_run.model.state_dict().items():
        assert torch.equal(module.state_dict()[k], v), k
    ids = module.tokenizer.encode("def f(x):")
    out = list(module.generate(ids, SamplingParams(8, temperature=0)))
    assert len(out) <= 8 and all(0 <= t < module.vocab_size for t in out)
    assert isinstance(module.tokenizer.decode(out), str)
    with pytest.raises(MemLMError, match="checkpoint not found"):
        load_module(tiny_run.run_dir / "nope.ckpt")


def test_checkpoint_carries_tokenizer_and_class(tiny_run):
    ckpt = torch.load(tiny_run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["memlm"]["class_path"] == "memlm.lightning_modules.transformer.TransformerLM"
    assert ckpt["memlm"]["tokenizer"] == tiny_run.datamodule.tokenizer.to_json()


def test_resume_with_a_different_tokenizer_is_refused(tiny_run, tmp_path):
    ckpt = tiny_run.run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(MemLMError, match="tokenizer differs from the checkpoint"):
        run_cli(tmp_path, f"--ckpt_path={ckpt}", "--data.init_args.tokenizer=byte", "--trainer.max_steps=12")


def test_rerun_into_same_run_directory(tmp_path, memlm_cache):
    quick = ("--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    args = ("--run.name=same", "--run.version=v", *quick)
    first = run_cli(tmp_path, *args)
    (first.run_dir / "config.yaml").write_text("# from the first run\n" + (first.run_dir / "config.yaml").read_text())
    second = run_cli(tmp_path, *args)  # config.yaml exists already: overwritten, no crash
    assert second.run_dir == first.run_dir == tmp_path / "same" / "v"
    assert not (second.run_dir / "config.yaml").read_text().startswith("# from the first run")
    # without --run.version every run gets the next version directory
    a = run_cli(tmp_path, *quick)
    b = run_cli(tmp_path, *quick)
    assert (a.run_dir.name, b.run_dir.name) == ("version_0", "version_1")


def test_print_config(capsys):
    with pytest.raises(SystemExit) as info:
        MemLMCLI(L.LightningModule, L.LightningDataModule,
                 args=["fit", "--config", str(CONFIG), "--model.init_args.n_layer=3", "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "memlm.lightning_modules.transformer.TransformerLM"
    assert printed["model"]["init_args"]["n_layer"] == 3
    assert printed["data"]["init_args"]["sampler"] == "random" and "run" in printed


def test_tensorboard_logger_and_no_logger(tmp_path, memlm_cache):
    cli = run_cli(tmp_path, "--run.name=tb", "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
                  "--trainer.limit_val_batches=0", logger="[tensorboard]")
    assert type(cli.trainer.logger).__name__ == "TensorBoardLogger"
    assert list(cli.run_dir.rglob("events.out.tfevents.*"))
    cli = run_cli(tmp_path, "--run.name=none", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                  logger="[none]")
    assert cli.trainer.logger is None and not (cli.run_dir / "metrics.csv").exists()
    # no logger still trains the one step and still writes last.ckpt (FinalLastCheckpoint) holding that step
    assert (cli.run_dir / "checkpoints" / "last.ckpt").is_file() and cli.trainer.global_step == 1
    assert torch.load(cli.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    with pytest.raises(MemLMError, match="unknown --run.logger"):
        run_cli(tmp_path, "--trainer.max_steps=1", logger="[mlflow]")


def test_wandb_without_api_key_goes_offline(tmp_path, memlm_cache, monkeypatch, capsys):
    """No key, WANDB_MODE unset: offline run under the run dir and a `wandb sync` hint."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MEMLM_QUIET", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cli = run_cli(tmp_path, "--run.name=wb", "--trainer.max_steps=1", "--trainer.limit_val_batches=0", logger="[wandb]")
    out = capsys.readouterr().out
    assert "no API key" in out and f"wandb sync {cli.run_dir}/wandb/offline-run-" in out
    logger = cli.trainer.logger
    assert type(logger).__name__ == "WandbLogger" and logger._offline
    assert logger.experiment.settings.mode in ("offline", "dryrun")  # wandb calls offline "dryrun"
    import wandb

    wandb.finish()
    assert list((cli.run_dir / "wandb").glob("offline-run-*"))


def test_bf16_mixed_on_cpu(tmp_path, memlm_cache):
    cli = run_cli(tmp_path, "--trainer.precision=bf16-mixed", "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
                  "--trainer.val_check_interval=3")
    rows = read_metrics(cli.run_dir)
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(r["val/loss"] for r in rows)
    assert cli.trainer.precision == "bf16-mixed"


MICRO = sorted((ROOT / "configs").glob("*_micro.yaml"))


@pytest.mark.parametrize("config", MICRO, ids=[p.stem for p in MICRO])
def test_fast_dev_run_micro_config(config, tmp_path, memlm_cache):
    """Every small config trains one batch and validates one batch as shipped (no tiny overrides)."""
    cli = run_cli(tmp_path, "--trainer.fast_dev_run=true", config=config, tiny=False)
    # global_step counts optimizer steps; non-gradient models (HTM, Hebbian) have none
    assert cli.trainer.state.finished and cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed >= 1


def test_last_checkpoint_is_the_final_state_even_without_improvement(tmp_path, memlm_cache):
    """Lightning's save_last only refreshes last.ckpt when the best checkpoint improves; ours
    must hold the newest state: after every validation and at the final step."""
    lr_too_high = "--model.init_args.optimizer.learning_rate=5.0"  # val/loss gets worse after the first check
    cli = run_cli(tmp_path, "--run.name=fresh", "--trainer.max_steps=7", "--trainer.val_check_interval=2",
                  lr_too_high, "--model.init_args.optimizer.warmup_steps=1")
    ckpt_dir = cli.run_dir / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 7
    best = [p for p in ckpt_dir.glob("best-*.ckpt")]
    assert len(best) == 1 and "last" not in best[0].name


def test_num_threads_option_sets_torch_threads(tmp_path, memlm_cache):
    before = torch.get_num_threads()
    try:
        run_cli(tmp_path, "--run.name=threads", "--trainer.fast_dev_run=true", "--run.num_threads=1")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        run_cli(tmp_path, "--run.name=threads2", "--trainer.fast_dev_run=true", "--run.num_threads=2")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
