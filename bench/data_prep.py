"""Corpus preparation speed: MB/s of TextDataModule's tokenize-and-cache path, char and BPE.

    python bench/data_prep.py [--mb 100] [--kinds char,bpe] [--vocab-size 8192] [--threads N]

The corpus is WikiText-2's held-out text (../shared/data/wikitext-2-heldout/valid.txt)
repeated to ``--mb`` megabytes (WikiText-103 is ~540 MB raw; 100 MB is the order of a
real run), read as ``source: files``. Each kind runs in a fresh cache directory and is timed
in two phases: training the tokenizer (BPE trains on the train split; char collects its
alphabet) and encoding all three splits into the memory-mapped token cache. The figure of
merit is encode MB/s (UTF-8 bytes of text per second); the goal is >= 20 MB/s for BPE on 2
cores. The last line is ``RESULT {json}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "wikitext-2-heldout" / "valid.txt"


def build_corpus(source: Path, megabytes: float, out: Path) -> int:
    text = source.read_text(encoding="utf-8")
    unit = len(text.encode("utf-8"))
    repeats = max(1, int(round(megabytes * 1e6 / unit)))
    with open(out, "w", encoding="utf-8") as fh:
        for _ in range(repeats):
            fh.write(text)
    return out.stat().st_size


def run(kind: str, corpus: Path, vocab_size: int, workdir: Path) -> dict:
    import numpy as np

    from memlm.datamodules.text import SPLITS, TextDataModule

    dm = TextDataModule(source="files", files=[str(corpus)], tokenizer=kind, vocab_size=vocab_size,
                        cache_dir=str(workdir / f"cache-{kind}"))
    t0 = time.perf_counter()
    dm._load_text()
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = dm.tokenizer
    t_train = time.perf_counter() - t0
    nbytes = sum(len(d.encode("utf-8")) for s in SPLITS for d in dm._splits[s])
    t0 = time.perf_counter()
    n_tokens = sum(len(dm.split_ids(s)) for s in SPLITS)
    t_encode = time.perf_counter() - t0
    cached = sum(p.stat().st_size for p in (workdir / f"cache-{kind}").rglob("*.npy"))
    # a second datamodule only memory-maps the cache
    t0 = time.perf_counter()
    again = TextDataModule(source="files", files=[str(corpus)], tokenizer=kind, vocab_size=vocab_size,
                           cache_dir=str(workdir / f"cache-{kind}"))
    assert np.array_equal(np.asarray(again.split_ids("val")), np.asarray(dm.split_ids("val")))
    t_reload = time.perf_counter() - t0
    return {
        "kind": kind, "vocab": tok.vocab_size, "text_MB": nbytes / 1e6, "tokens_M": n_tokens / 1e6,
        "read_s": t_read, "train_tokenizer_s": t_train, "encode_s": t_encode,
        "encode_MB_per_s": nbytes / 1e6 / t_encode, "cache_MB": cached / 1e6, "reload_s": t_reload,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=100.0, help="corpus size in MB")
    p.add_argument("--kinds", default="char,bpe")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--source", default=str(SOURCE))
    p.add_argument("--threads", type=int, default=None, help="RAYON_NUM_THREADS for tokenizers (default: all cores)")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    sys.path.insert(0, str(ROOT))
    from memlm.core.bench import print_result, print_table

    source = Path(args.source)
    if not source.is_file():
        raise SystemExit(f"error: corpus source not found: {source}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="memlm-prep-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size = build_corpus(source, args.mb, corpus)
        print(f"corpus: {size / 1e6:.1f} MB ({source.name} repeated)")
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            rows.append(run(kind, corpus, args.vocab_size, Path(tmp)))
            print_table(rows[-1:])
    print()
    print_table(rows)
    figures = {f"{r['kind']}_encode_MB_per_s": round(r["encode_MB_per_s"], 2) for r in rows}
    figures.update({f"{r['kind']}_train_tokenizer_s": round(r["train_tokenizer_s"], 2) for r in rows})
    print_result(figures, {"corpus_MB": round(size / 1e6, 1), "vocab_size": args.vocab_size, "kinds": args.kinds,
                           "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "all")})


if __name__ == "__main__":
    main()
