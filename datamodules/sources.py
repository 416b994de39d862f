"""Where text comes from: the builtin offline corpus, local files, or Hugging Face datasets.

Each loader returns ``{"train": [docs], "val": [docs], "test": [docs]}`` plus a stable
identity string used to key the on-disk token cache.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from memlm.core.errors import MemLMError

Splits = dict[str, list[str]]

WIKITEXT_NAMES = {
    "train": ["wiki.train.raw", "wiki.train.tokens", "train.txt"],
    "val": ["wiki.valid.raw", "wiki.valid.tokens", "valid.txt", "validation.txt", "val.txt"],
    "test": ["wiki.test.raw", "wiki.test.tokens", "test.txt"],
}


def builtin_corpus() -> tuple[Splits, str]:
    """CPython's own documentation text (``pydoc_data.topics``): ~465 kB, no download.

    Topics are split by a stable rule (every 20th topic to val, the next to test) so
    the split never depends on dict order or on randomness.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    splits: Splits = {"train": [], "val": [], "test": []}
    for i, name in enumerate(names):
        key = "val" if i % 20 == 3 else "test" if i % 20 == 13 else "train"
        splits[key].append(topics[name].strip())
    ident = f"builtin:pydoc_data:{sys.version_info.major}.{sys.version_info.minor}"
    return splits, ident


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise MemLMError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MemLMError(f"data file {path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); convert it to UTF-8") from exc
    if not text.strip():
        raise MemLMError(f"data file {path} is empty")
    return text


def _file_ident(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "files:" + h.hexdigest()


def local_files(
    data_dir: str | None, files: list[str] | None, val_fraction: float, test_fraction: float
) -> tuple[Splits, str]:
    """A WikiText-layout directory (train/valid/test files) or a list of text files.

    Files without a split layout are concatenated and the tail is cut off for val/test.
    """
    if data_dir:
        root = Path(data_dir)
        if not root.is_dir():
            raise MemLMError(f"data_dir not found: {root}")
        found = {
            split: next((root / n for n in names if (root / n).is_file()), None) for split, names in WIKITEXT_NAMES.items()
        }
        if found["train"] is not None:
            paths = [p for p in found.values() if p is not None]
            splits = {s: [_read_text(p)] if p is not None else [] for s, p in found.items()}
            if not splits["val"]:
                splits = _cut(splits["train"][0], val_fraction, test_fraction)
            return splits, _file_ident(paths)
        files = sorted(str(p) for p in root.glob("*.txt"))
        if not files:
            raise MemLMError(f"no wiki.train.raw / train.txt / *.txt files in {root}")
    if not files:
        raise MemLMError("source=files needs data.data_dir or data.files")
    paths = [Path(f) for f in files]
    text = "\n\n".join(_read_text(p) for p in paths)
    return _cut(text, val_fraction, test_fraction), _file_ident(paths)


def _cut(text: str, val_fraction: float, test_fraction: float) -> Splits:
    n = len(text)
    n_val, n_test = int(n * val_fraction), int(n * test_fraction)
    train_end = n - n_val - n_test
    if train_end <= 0:
        raise MemLMError("val_fraction + test_fraction leave no training text")
    return {
        "train": [text[:train_end]],
        "val": [text[train_end : train_end + n_val]] if n_val else [],
        "test": [text[train_end + n_val :]] if n_test else [],
    }


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or endpoint
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


LOCAL_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}


def _local_hf(path: Path, config: str | None):
    """A dataset on disk: a ``save_to_disk`` folder, one data file, or a folder of split files."""
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
    elif path.is_file():
        kind = LOCAL_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise MemLMError(f"unsupported dataset file {path}: use one of {', '.join(sorted(LOCAL_FORMATS))}")
        ds = datasets.load_dataset(kind, data_files=str(path))
    else:  # e.g. train.parquet / validation.parquet / test.parquet (the WikiText layout on the hub)
        ds = datasets.load_dataset(str(path), config)
    return datasets.DatasetDict({"train": ds}) if isinstance(ds, datasets.Dataset) else ds


def hf_dataset(name: str, config: str | None, text_field: str = "text", max_chars: int | None = None,
               val_fraction: float = 0.05, test_fraction: float = 0.05) -> tuple[Splits, str]:
    """A Hugging Face dataset (e.g. ``wikitext`` / ``wikitext-103-raw-v1``), from cache when offline,
    or a local one (``name`` is a path, see :func:`_local_hf`).

    Offline is detected up front (env flags, or no route to the hub within 3 s) so a
    missing dataset fails in seconds with a hint instead of hanging in retries. Rows are
    documents; a dataset without a validation split gets val/test cut from the end of train.
    """
    local = Path(name).expanduser()
    if local.exists():
        return _hf_splits(_local_hf(local, config), name, text_field, max_chars, val_fraction, test_fraction,
                          _file_ident(sorted(p for p in [local, *local.rglob("*")] if p.is_file())))
    offline = _offline_env() or not _hub_reachable()
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
        import huggingface_hub.constants as hub_constants

        if offline:
            hub_constants.HF_HUB_OFFLINE = True
            datasets.config.HF_HUB_OFFLINE = True
        ds = datasets.load_dataset(name, config)
    except Exception as exc:  # datasets raises many types; all mean "not available"
        where = "is not in the local cache and the hub is unreachable (offline)" if offline else f"could not be loaded ({exc})"
        raise MemLMError(
            f"dataset {name!r}{'/' + config if config else ''} {where}; use --data.source=files "
            "--data.data_dir=DIR (WikiText layout) or --data.source=builtin"
        ) from exc
    return _hf_splits(ds, name, text_field, max_chars, val_fraction, test_fraction, f"hf:{name}:{config}")


SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val"), "test": ("test",)}


def _hf_splits(ds, name: str, text_field: str, max_chars: int | None, val_fraction: float, test_fraction: float,
               ident: str) -> tuple[Splits, str]:
    splits: Splits = {}
    for ours, theirs in SPLIT_NAMES.items():
        split = next((ds[t] for t in theirs if t in ds), None)
        if split is None:
            splits[ours] = []
            continue
        if text_field not in split.column_names:
            raise MemLMError(f"dataset {name!r} has no field {text_field!r} (it has {', '.join(split.column_names)}); "
                             "set --data.text_field")
        docs, total = [], 0
        for row in split[text_field]:
            line = row or ""
            # WikiText rows are lines that end in "\n"; other datasets' rows are whole documents.
            docs.append(line if line.endswith("\n") else line + "\n")
            total += len(docs[-1])
            if max_chars and total >= max_chars:
                break
        splits[ours] = ["".join(docs)]
    if not splits["train"] or not splits["train"][0].strip():
        raise MemLMError(f"dataset {name!r} has no text in field {text_field!r}")
    if not splits["val"]:
        held_out = _cut(splits["train"][0], val_fraction, 0.0 if splits["test"] else test_fraction)
        splits = {"train": held_out["train"], "val": held_out["val"], "test": splits["test"] or held_out["test"]}
    return splits, f"{ident}:{text_field}:{max_chars}:{val_fraction}:{test_fraction}"
