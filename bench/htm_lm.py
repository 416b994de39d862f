"""HTM as a character language model on tinyshakespeare, against a Kneser-Ney n-gram.

The last 10% of the text is held out. HTM (the bounded-growth micro model of
bench/htm_text.py, overridable with --set) learns the first 90% as one stream, learning on,
until its CPU budget is spent (10 CPU-minutes; --quick 2); then it is scored on the held-out
tail with learning off. The n-gram (models/ngram.py, interpolated Kneser-Ney) is fitted on
exactly the characters HTM saw, its order tuned on the last 10% of those (orders 1-10),
and scored on the same tail; an n-gram fitted on the whole 90% is printed beside it.

    python bench/htm_lm.py [--quick] [--budget-cpu-s 600] [--eval-chars N] [--online-eval] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from htm_text import BOUNDED, SHAKESPEARE, build, rate, read_text, train_stream  # noqa: E402

from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import MemLMError, run_main  # noqa: E402
from memlm.models.ngram import KneserNeyNGram  # noqa: E402


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise MemLMError(f"--set {item!r}: use key=value, e.g. --set cells_per_column=8")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def tune_ngram(train: np.ndarray, vocab: int, orders=range(1, 11)) -> tuple[int, list[dict]]:
    cut = int(len(train) * 0.9)
    rows = []
    for n in orders:
        bits = KneserNeyNGram(n, vocab).fit(train[:cut]).bits_per_token(train, start=cut)
        rows.append({"order": n, "dev_bits_per_char": bits})
    best = min(rows, key=lambda r: r["dev_bits_per_char"])["order"]
    return best, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 CPU-minutes of HTM training, 20k held-out chars")
    ap.add_argument("--budget-cpu-s", type=float, default=None, help="HTM training budget (default 600, quick 120)")
    ap.add_argument("--eval-chars", type=int, default=None, help="held-out chars scored (default all, quick 20000)")
    ap.add_argument("--data", default=None, help="text file (default tinyshakespeare)")
    ap.add_argument("--set", nargs="*", default=[], help="HTMLanguageModel init args, key=value")
    ap.add_argument("--online-eval", action="store_true",
                    help="also score the tail prequentially (each char predicted, then learned): bpb_htm_online")
    args = ap.parse_args()
    budget = args.budget_cpu_s or (120.0 if args.quick else 600.0)
    overrides = parse_sets(args.set)
    text = read_text(args.data or SHAKESPEARE)
    split = int(len(text) * 0.9)
    model = build(text, **overrides)
    tok = model.tokenizer
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    if len(ids) != len(text):
        raise MemLMError("the char tokenizer did not give one token per character; use a plain-text file")
    train, held = ids[:split], ids[split:]
    eval_chars = args.eval_chars or (20_000 if args.quick else len(held))
    held = held[: eval_chars + 1]
    n_bytes = len(text[split : split + len(held) - 1].encode("utf-8"))

    rows = train_stream(model, train, cpu_budget=budget,
                        log=lambda r: print(f"  {r['tokens_seen']:>8,} tokens  {r['tokens_per_cpu_s']:6.0f} tok/CPU-s  "
                                            f"nll {r['train_nll']:.3f}  anomaly {r['anomaly']:.2f}  "
                                            f"synapses {r['synapses']:,}", flush=True)
                        if len(r) and r["tokens_seen"] % 20_000 < r["tokens"] else None)
    seen = rows[-1]["tokens_seen"]
    train_cpu = sum(r["cpu_s"] for r in rows)

    model.tm.reset()
    c0 = time.process_time()
    nll, _, anomaly, _ = model.process(held[:-1], held[1:], learn=False)
    eval_cpu = time.process_time() - c0
    bpb_htm = float(nll.sum() / math.log(2) / n_bytes)
    bpb_online = None
    if args.online_eval:  # after the learning-off score: this changes the model
        model.tm.reset()
        online_nll, _, _, _ = model.process(held[:-1], held[1:], learn=True)
        bpb_online = float(online_nll.sum() / math.log(2) / n_bytes)

    seen_ids = train[: seen + 1]
    order, tune_rows = tune_ngram(seen_ids, tok.vocab_size)
    c0 = time.process_time()
    ngram = KneserNeyNGram(order, tok.vocab_size).fit(seen_ids)
    ngram_cpu = time.process_time() - c0
    # score the same targets as HTM: held[1:], each from the text before it (held[0] is context only)
    both = np.concatenate([seen_ids[-(order - 1):] if order > 1 else seen_ids[:0], held])
    skip = len(both) - (len(held) - 1)
    bpb_ngram = float(-ngram.log_probs(both, start=skip).sum() / math.log(2) / n_bytes)
    full_order, _ = tune_ngram(train, tok.vocab_size)
    full = KneserNeyNGram(full_order, tok.vocab_size).fit(train)
    both = np.concatenate([train[-(full_order - 1):] if full_order > 1 else train[:0], held])
    bpb_ngram_full = float(-full.log_probs(both, start=len(both) - (len(held) - 1)).sum() / math.log(2) / n_bytes)

    print_table(tune_rows)
    print_table([
        {"model": "HTM (bounded micro)", "train chars": seen, "train CPU-s": train_cpu, "val bpb": bpb_htm,
         "val anomaly": float(anomaly.mean())},
        {"model": f"KN {order}-gram, same chars", "train chars": seen, "train CPU-s": ngram_cpu, "val bpb": bpb_ngram,
         "val anomaly": None},
        {"model": f"KN {full_order}-gram, all 90%", "train chars": len(train), "train CPU-s": None,
         "val bpb": bpb_ngram_full, "val anomaly": None},
    ])
    figures = {
        "bpb_htm": bpb_htm,
        "bpb_ngram": bpb_ngram,
        "bpb_ngram_full_train": bpb_ngram_full,
        "htm_over_ngram": bpb_htm / bpb_ngram,
        **({"bpb_htm_online": bpb_online} if bpb_online is not None else {}),
        "ngram_order": order,
        "train_chars_htm": seen,
        "htm_train_cpu_s": train_cpu,
        "htm_eval_cpu_s": eval_cpu,
        "tokens_per_cpu_s_first_100k": rate(rows, first=100_000),
        "tokens_per_cpu_s_last_100k": rate(rows, last=100_000),
        "htm_val_anomaly": float(anomaly.mean()),
        "synapses": model.tm.num_synapses,
    }
    print(f"\nHTM {bpb_htm:.3f} bpb vs KN {order}-gram {bpb_ngram:.3f} on the same {seen:,} chars "
          f"(ratio {bpb_htm / bpb_ngram:.2f}; goal <= 2.6 and <= 1.10)")
    print_result(figures, {"data": "tinyshakespeare", "split": "first 90% train, last 10% held out",
                           "eval_chars": len(held) - 1, "budget_cpu_s": budget, "quick": args.quick,
                           "model": {**BOUNDED, **overrides}, "load_average": os.getloadavg()[0]})
    return 0


if __name__ == "__main__":
    run_main(main)
