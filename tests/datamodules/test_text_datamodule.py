"""TextDataModule and its loaders: sources, token cache, windows, streams, rank sharding, resume."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from memlm.datamodules import sources
from memlm.datamodules.loaders import RandomWindowLoader, SequentialWindowLoader, StreamLoader
from memlm.datamodules.text import TextDataModule
from memlm.core.errors import MemLMError

IDS = np.arange(10_000, dtype=np.int64) % 50_000  # distinct, increasing: position == value


def fake_trainer(rank=0, world=1, epoch=0):
    return SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)


# -- sources --------------------------------------------------------------------------
def test_builtin_corpus_is_stable_and_split():
    a, ident = sources.builtin_corpus()
    b, _ = sources.builtin_corpus()
    assert a == b and ident.startswith("builtin:")
    assert len(a["train"]) > 10 * len(a["val"]) > 0 and len(a["test"]) > 0
    assert not set(a["train"]) & set(a["val"])
    assert sum(map(len, a["train"])) > 300_000


def test_builtin_split_ids_and_cache(memlm_cache):
    dm = TextDataModule(tokenizer="char", block_size=32, batch_size=4)
    splits, _ = sources.builtin_corpus()
    for split in ("train", "val", "test"):
        ids = dm.split_ids(split)
        assert ids.dtype == np.uint16
        # one EOS after every document, and the ids decode back to the documents
        assert int((ids == dm.tokenizer.eos_id).sum()) == len(splits[split])
    val = np.asarray(dm.split_ids("val"))
    first_eos = int(np.argmax(val == dm.tokenizer.eos_id))
    assert dm.tokenizer.decode(val[:first_eos].tolist()) == splits["val"][0]
    assert dm.vocab_size == dm.tokenizer.vocab_size
    # a second datamodule reuses the cache: same tokenizer, memory-mapped ids, identical values
    files = sorted(p.name for p in memlm_cache.rglob("*") if p.is_file())
    dm2 = TextDataModule(tokenizer="char", block_size=64, batch_size=8)
    assert dm2.tokenizer.fingerprint() == dm.tokenizer.fingerprint()
    ids2 = dm2.split_ids("train")
    assert isinstance(ids2, np.memmap)
    assert np.array_equal(np.asarray(ids2), np.asarray(dm.split_ids("train")))
    assert sorted(p.name for p in memlm_cache.rglob("*") if p.is_file()) == files


def test_corrupt_cache_is_rebuilt(tmp_path):
    dm = TextDataModule(source="files", files=[str(_write(tmp_path / "a.txt", "abc def\n" * 500))],
                        tokenizer="char", cache_dir=str(tmp_path / "cache"))
    ids = np.asarray(dm.split_ids("train")).copy()
    tok_file = next((tmp_path / "cache").rglob("tokenizer.json"))
    npy = next((tmp_path / "cache").rglob("*-train.npy"))
    tok_file.write_text("garbage", encoding="utf-8")
    npy.write_bytes(b"garbage")
    dm2 = TextDataModule(source="files", files=[str(tmp_path / "a.txt")], tokenizer="char",
                         cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(np.asarray(dm2.split_ids("train")), ids)


def _write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def test_files_source_wikitext_layout(tmp_path):
    _write(tmp_path / "wiki.train.raw", "train text " * 400)
    _write(tmp_path / "wiki.valid.raw", "valid text " * 50)
    _write(tmp_path / "wiki.test.raw", "test text " * 50)
    splits, ident = sources.local_files(str(tmp_path), None, 0.1, 0.1)
    assert splits["train"] == ["train text " * 400] and splits["val"] == ["valid text " * 50]
    assert splits["test"] == ["test text " * 50] and ident.startswith("files:")


def test_files_source_cut_fractions(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    p = _write(tmp_path / "x.txt", text)
    splits, _ = sources.local_files(None, [str(p)], 0.1, 0.05)
    assert splits["train"][0] + splits["val"][0] + splits["test"][0] == text
    assert len(splits["val"][0]) == 100 and len(splits["test"][0]) == 50
    # a directory of plain *.txt files works too
    splits2, _ = sources.local_files(str(tmp_path), None, 0.1, 0.05)
    assert splits2 == splits


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: (None, [str(d / "missing.txt")]), "data file not found"),
        (lambda d: (None, [str(_write(d / "empty.txt", "  \n"))]), "is empty"),
        (lambda d: (None, [str(_write(d / "latin.txt", "caf\xe9 " * 10, encoding="latin-1"))]), "not valid UTF-8"),
        (lambda d: (str(d / "nodir"), None), "data_dir not found"),
        (lambda d: (str(d), None), "no wiki.train.raw"),
        (lambda d: (None, None), "needs data.data_dir or data.files"),
    ],
)
def test_files_source_errors(tmp_path, setup, match):
    data_dir, files = setup(tmp_path)
    with pytest.raises(MemLMError, match=match) as info:
        TextDataModule(source="files", data_dir=data_dir, files=files, tokenizer="char",
                       cache_dir=str(tmp_path / "cache")).setup("fit")
    assert "\n" not in str(info.value)


def test_unknown_hf_dataset_offline_fails_fast(monkeypatch, tmp_path):
    """No env flag, hub unreachable (a closed loopback port): a hint within seconds, no hang."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets  # noqa: F401  (import time is not what this test measures)

    t0 = time.process_time(), time.perf_counter()
    with pytest.raises(MemLMError) as info:
        TextDataModule(source="hf", dataset_name="no_such_dataset_xyz", tokenizer="char",
                       cache_dir=str(tmp_path / "cache")).setup("fit")
    cpu, wall = time.process_time() - t0[0], time.perf_counter() - t0[1]
    msg = str(info.value)
    assert "offline" in msg and "--data.data_dir" in msg and "\n" not in msg
    assert cpu < 5 and wall < 30, (cpu, wall)


def test_bad_datamodule_arguments():
    with pytest.raises(MemLMError, match="data.source"):
        TextDataModule(source="web")
    with pytest.raises(MemLMError, match="data.sampler"):
        TextDataModule(sampler="shuffle")
    with pytest.raises(MemLMError, match="dataset_name"):
        TextDataModule(source="hf")


def test_block_size_longer_than_training_split(tmp_path):
    p = _write(tmp_path / "short.txt", "tiny text\n" * 5)
    dm = TextDataModule(source="files", files=[str(p)], tokenizer="char", block_size=512, val_fraction=0.0,
                        test_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MemLMError, match="fewer than block_size 512"):
        dm.setup("fit")


# -- random windows ---------------------------------------------------------------------
def test_random_windows_are_shifted_slices():
    loader = RandomWindowLoader(IDS, block_size=16, batch_size=4, steps=5, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    for b in batches:
        x, y = b["input_ids"], b["targets"]
        assert x.shape == y.shape == (4, 16) and str(x.dtype) == "torch.int64"
        assert (y[:, :-1] == x[:, 1:]).all()
        assert ((x[:, 1:] - x[:, :-1]) == 1).all()  # contiguous slices of IDS
        assert int(y.max()) < len(IDS)


def test_random_windows_seeded_by_seed_epoch_rank():
    def starts(seed=0, epoch=0, rank=0, world=1):
        ld = RandomWindowLoader(IDS, 16, 4, steps=6, seed=seed, rank=rank, world_size=world, epoch_fn=lambda: epoch)
        return np.stack([b["input_ids"][:, 0].numpy() for b in ld])

    assert np.array_equal(starts(), starts())
    assert not np.array_equal(starts(), starts(seed=1))
    assert not np.array_equal(starts(), starts(epoch=1))
    r0, r1 = starts(rank=0, world=2), starts(rank=1, world=2)
    assert not np.array_equal(r0, r1)
    assert len(set(r0.ravel()) & set(r1.ravel())) < 3  # ranks draw (almost) disjoint windows


def test_datamodule_shards_train_by_rank(memlm_cache):
    out = []
    for rank in (0, 1):
        dm = TextDataModule(tokenizer="char", block_size=32, batch_size=4, steps_per_epoch=3)
        dm.trainer = fake_trainer(rank, 2)
        loader = dm.train_dataloader()
        assert isinstance(loader, RandomWindowLoader) and (loader.rank, loader.world_size) == (rank, 2)
        out.append(np.concatenate([b["input_ids"].numpy() for b in loader]))
    assert not np.array_equal(out[0], out[1])


def test_default_steps_per_epoch_is_one_pass(memlm_cache):
    dm = TextDataModule(tokenizer="char", block_size=32, batch_size=4)
    n = len(dm.split_ids("train"))
    assert len(dm.train_dataloader()) == n // (4 * 32)
    dm.trainer = fake_trainer(0, 2)
    assert len(dm.train_dataloader()) == n // (4 * 32 * 2)


@pytest.mark.parametrize("consumed", [0, 1, 3, 6])
def test_random_loader_resumes_mid_epoch(consumed):
    full = [b["input_ids"] for b in RandomWindowLoader(IDS, 16, 4, steps=6, seed=5)]
    loader = RandomWindowLoader(IDS, 16, 4, steps=6, seed=5)
    it = iter(loader)
    for _ in range(consumed):  # Lightning does not pre-fetch from a loader with a length
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed": consumed}
    resumed = RandomWindowLoader(IDS, 16, 4, steps=6, seed=5)
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    expect = full[consumed:] if consumed < 6 else full  # a finished epoch restarts from the top
    assert len(rest) == len(expect) and all((a == b).all() for a, b in zip(rest, expect))
    # the skip applies once: the next epoch is complete again
    assert len(list(resumed)) == 6


# -- sequential evaluation windows --------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sequential_windows_cover_split_once(world):
    ids = np.arange(1000)
    seen = []
    for rank in range(world):
        for b in SequentialWindowLoader(ids, 16, 5, rank, world):
            x, y = b["input_ids"].numpy(), b["targets"].numpy()
            assert (y == x + 1).all()
            seen.extend(x[:, 0].tolist())
    assert sorted(seen) == list(range(0, 16 * ((1000 - 1) // 16), 16))


def test_sequential_max_windows_and_order():
    ld = SequentialWindowLoader(np.arange(1000), 10, 4, max_windows=6)
    starts = [b["input_ids"][:, 0].tolist() for b in ld]
    assert starts == [[0, 10, 20, 30], [40, 50]]


# -- contiguous streams (TBPTT) ---------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2])
def test_stream_loader_is_contiguous_and_sharded(world):
    B, T = 3, 8
    rows = {}
    for rank in range(world):
        ld = StreamLoader(IDS[:1000], T, B, rank, world)
        batches = list(ld)
        assert len(batches) == len(ld) and batches[0]["first"] and not any(b["first"] for b in batches[1:])
        assert all(b["stream"] is True and b["chunk"] == k for k, b in enumerate(batches))
        x = np.concatenate([b["input_ids"].numpy() for b in batches], axis=1)  # [B, n_chunks*T]
        y = np.concatenate([b["targets"].numpy() for b in batches], axis=1)
        assert (y == x + 1).all()  # targets continue the stream, also across chunk edges
        assert ((x[:, 1:] - x[:, :-1]) == 1).all()  # chunk k+1 of a row continues chunk k
        for b in range(B):
            rows[rank * B + b] = x[b]
    stream_len = 1000 // (B * world)
    # rank r owns streams r*B..r*B+B-1: disjoint, in order, starting at s*stream_len
    assert sorted(rows) == list(range(B * world))
    assert [int(rows[s][0]) for s in sorted(rows)] == [s * stream_len for s in range(B * world)]


def test_stream_loader_resume_and_errors():
    ld = StreamLoader(IDS[:1000], 8, 3)
    full = [b["input_ids"] for b in ld]
    it = iter(ld)
    for _ in range(3):
        next(it)
    again = StreamLoader(IDS[:1000], 8, 3)
    again.load_state_dict(ld.state_dict())
    rest = [b for b in again]
    assert rest[0]["chunk"] == 3 and not rest[0]["first"]
    assert all((a["input_ids"] == b).all() for a, b in zip(rest, full[3:]))
    assert len(StreamLoader(IDS[:1000], 8, 3, max_chunks=2)) == 2
    with pytest.raises(MemLMError, match="too short"):
        StreamLoader(IDS[:100], 32, 4)


def test_stream_datamodule_loaders(memlm_cache):
    dm = TextDataModule(tokenizer="char", block_size=32, batch_size=4, sampler="stream", max_val_batches=2)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train, StreamLoader) and isinstance(val, StreamLoader) and len(val) == 2
    b = next(iter(train))
    assert b["first"] and b["input_ids"].shape == (4, 32)
    dm.trainer = fake_trainer(1, 2)
    other = next(iter(dm.train_dataloader()))
    assert not (other["input_ids"] == b["input_ids"]).all()
