"""One evaluation accumulator for every architecture: the token-weighted sums themselves, and
``validate`` / ``test`` through the real CLI logging the same keys for each micro config."""
from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI
from memlm.lightning_modules.evaluation import LN2, EvalAccumulator, TokenSums

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"loss", "ppl", "bpb", "acc"}

TEXT_DATA = ["--data.init_args.tokenizer=char", "--data.init_args.block_size=32", "--data.init_args.batch_size=2",
             "--data.init_args.max_val_batches=2"]
TINY = {
    "transformer_micro": ["--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
                          "--model.init_args.block_size=32", *TEXT_DATA],
    "hmst_micro": ["--model.init_args.block_size=32", "--model.init_args.n_layer=2", "--model.init_args.exit_layer=1",
                   "--model.init_args.n_head=2", "--model.init_args.d_model=32", "--model.init_args.d_ff=32",
                   "--model.init_args.n_experts=4", "--model.init_args.ssm_d_state=4",
                   "--model.init_args.mem_max_items=1000", "--model.init_args.episodic_capacity=16",
                   "--model.init_args.controller_hidden=16", "--model.init_args.critic_d_model=16",
                   "--model.init_args.critic_heads=2", "--model.init_args.critic_max_len=32", *TEXT_DATA],
    "hamt_micro": ["--model.init_args.n_layer=1", "--model.init_args.n_embd=32", "--model.init_args.n_slots=2",
                   *TEXT_DATA],
    "htm_micro": ["--model.init_args.encoder_size=256", "--model.init_args.encoder_active_bits=16",
                  "--model.init_args.columns=256", "--model.init_args.sp_density=0.0625",
                  "--model.init_args.cells_per_column=4", "--model.init_args.activation_threshold=8",
                  "--model.init_args.min_threshold=6", "--model.init_args.max_new_synapse_count=12", *TEXT_DATA],
    "hebbian_micro": ["--model.init_args.neurons_per_column=4", "--model.init_args.synapses_per_neuron=8",
                      "--data.init_args.builtin_items=60", "--data.init_args.val_fraction=0.1",
                      "--data.init_args.batch_size=4"],
}


def test_token_weighted_loss_over_two_uneven_batches():
    sums = TokenSums()
    sums.update(torch.tensor(1.0 + 2.0 + 3.0), 3, 5, 2)  # 3 tokens, 5 bytes, 2 right
    sums.update(torch.tensor(10.0), 1, 3, 1)  # 1 token, 3 bytes, 1 right
    got = sums.compute()
    assert set(got) == KEYS
    # 16 nats over 4 tokens; the mean of the two batch means would be (2 + 10) / 2 = 6
    assert float(got["loss"]) == pytest.approx(4.0)
    assert float(got["ppl"]) == pytest.approx(math.exp(4.0))
    assert float(got["bpb"]) == pytest.approx(16.0 / (LN2 * 8))
    assert float(got["acc"]) == pytest.approx(0.75)
    sums.reset()
    assert sums.compute() == {}  # nothing scored after a reset: nothing to log


def test_bits_per_byte_is_left_out_when_bytes_are_unknown():
    acc = EvalAccumulator()
    acc.sums(0).update(torch.tensor(2.0), 2, 0, 1)  # a tokenizer without byte lengths counts 0 bytes
    assert set(acc.sums(0).compute()) == {"loss", "ppl", "acc"}
    assert len(acc.loaders) == 1 and acc.sums(0) is acc.loaders[0]


def run(subcommand: str, stem: str, root: Path) -> dict[str, float]:
    argv = [subcommand, "--config", str(ROOT / "configs" / f"{stem}.yaml"), "--run.root", str(root),
            "--run.logger=[none]", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            *TINY[stem]]
    try:
        cli = MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


@pytest.mark.parametrize("stem", sorted(TINY))
def test_validate_and_test_log_the_same_keys_for_every_architecture(stem, tmp_path, memlm_cache):
    for split, subcommand in (("val", "validate"), ("test", "test")):
        metrics = run(subcommand, stem, tmp_path)
        logged = {k.split("/", 1)[1] for k in metrics if k.startswith(f"{split}/")}
        assert logged == KEYS, f"{stem} {subcommand}: {sorted(metrics)}"
        loss = metrics[f"{split}/loss"]
        assert math.isfinite(loss) and loss > 0
        assert metrics[f"{split}/ppl"] == pytest.approx(math.exp(min(loss, 50.0)), rel=1e-4)
        assert 0.0 <= metrics[f"{split}/acc"] <= 1.0
        assert math.isfinite(metrics[f"{split}/bpb"]) and metrics[f"{split}/bpb"] > 0
