"""``source: hf`` end to end on datasets the test builds locally (no hub, no network): a
``save_to_disk`` folder, the WikiText layout as parquet split files, and one parquet file.

Each case checks that the tokens the datamodule trains on decode back to exactly the
dataset's rows, split by split, and that a 2-step fit runs on them through the CLI.
"""
from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest

from memlm.core.errors import MemLMError
from memlm.datamodules.text import TextDataModule

datasets = pytest.importorskip("datasets")

WORDS = "the memory of a model is what it keeps between one window and the next".split()


def rows(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=12)) + " .\n" for _ in range(n)]


TRAIN, VAL, TEST = rows(300, 1), rows(40, 2), rows(40, 3)


def decoded(dm: TextDataModule, split: str) -> str:
    ids = np.asarray(dm.split_ids(split))
    return dm.tokenizer.decode([int(i) for i in ids if i != dm.tokenizer.eos_id])


def build(kind: str, root) -> str:
    parts = {"train": TRAIN, "validation": VAL, "test": TEST}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v, "id": list(range(len(v)))}) for k, v in parts.items()})
    if kind == "save_to_disk":
        dd.save_to_disk(str(root / "saved"))
        return str(root / "saved")
    if kind == "wikitext_parquet":
        (root / "wikitext").mkdir()
        for split, ds in dd.items():
            ds.to_parquet(str(root / "wikitext" / f"{split}.parquet"))
        return str(root / "wikitext")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["save_to_disk", "wikitext_parquet"])
def test_local_hf_dataset_splits_and_tokens(kind, tmp_path):
    path = build(kind, tmp_path)
    dm = TextDataModule(source="hf", dataset_name=path, tokenizer="char", block_size=32, batch_size=4,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert decoded(dm, "train") == "".join(TRAIN)
    assert decoded(dm, "val") == "".join(VAL)
    assert decoded(dm, "test") == "".join(TEST)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert np.array_equal(batch["input_ids"][:, 1:].numpy(), batch["targets"][:, :-1].numpy())


def test_single_parquet_file_gets_val_and_test_cut_from_train(tmp_path):
    path = tmp_path / "corpus.parquet"
    datasets.Dataset.from_dict({"body": [r.rstrip("\n") for r in TRAIN]}).to_parquet(str(path))
    dm = TextDataModule(source="hf", dataset_name=str(path), text_field="body", tokenizer="char",
                        val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    text = "".join(TRAIN)  # rows without a newline become one line each
    train, val, test = decoded(dm, "train"), decoded(dm, "val"), decoded(dm, "test")
    assert train + val + test == text
    assert len(val) == int(len(text) * 0.1) and len(test) == int(len(text) * 0.1)
    # the cache is keyed by the file: rewriting it gives different tokens, not stale ones
    datasets.Dataset.from_dict({"body": [r.rstrip("\n") for r in VAL]}).to_parquet(str(path))
    os.utime(path, ns=(1, 1))
    dm2 = TextDataModule(source="hf", dataset_name=str(path), text_field="body", tokenizer="char",
                         val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    assert decoded(dm2, "train") + decoded(dm2, "val") + decoded(dm2, "test") == "".join(VAL)


def test_missing_text_field_is_one_line(tmp_path):
    path = build("save_to_disk", tmp_path)
    with pytest.raises(MemLMError, match="no field 'content'.*--data.text_field") as info:
        TextDataModule(source="hf", dataset_name=path, text_field="content", tokenizer="char",
                       cache_dir=str(tmp_path / "cache")).setup("fit")
    assert "\n" not in str(info.value)


def test_fit_through_the_cli_on_a_local_hf_dataset(tmp_path):
    from pathlib import Path

    from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI

    path = build("wikitext_parquet", tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs" / "transformer_micro.yaml"
    argv = ["fit", "--config", str(config), "--run.root", str(tmp_path / "runs"), "--run.logger=[csv]",
            "--data.init_args.source=hf", f"--data.init_args.dataset_name={path}", "--data.init_args.tokenizer=char",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.block_size=32",
            "--data.init_args.batch_size=4", "--data.init_args.max_val_batches=1",
            "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=32",
            "--model.init_args.block_size=32", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    try:
        cli = MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    assert cli.trainer.global_step == 2
    tok = cli.datamodule.tokenizer
    assert cli.model.vocab_size == tok.vocab_size and tok.decode(tok.encode(TRAIN[0])) == TRAIN[0]
    assert np.isfinite(float(cli.trainer.callback_metrics["val/loss"]))
