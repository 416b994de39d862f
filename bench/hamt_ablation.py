"""HAMT design ablations, each on MQAR and on text bpb at an equal step budget.

    python bench/hamt_ablation.py [--quick] [--variants base binding=circular ...] [--mqar-steps N]
                                  [--text-steps N] [--pairs 8] [--plot-dir DIR]

Variants (HAMTConfig overrides of the 4 x 64 micro model used by bench/hamt_recall.py):

- binding: ``elementwise`` (bipolar, the base) vs ``circular`` (FFT);
- slots: 1, 4, 8 (base), 16;
- key source: ``content`` (base) vs ``position`` vs ``mix`` (half the key dimensions each);
- gate mode: ``parallel`` (base) vs ``recurrent`` (the write gate reads the slot state);
- the aux reconstruction loss: 0.1 (base) vs 0;
- extra probes of the 8-pair capacity question: ``tau_min=64`` (no short-lived slots).

Each variant trains twice from the same seed: on MQAR (``--pairs`` pairs, default 8, with 4 x pairs
keys; length 64 with the length curriculum; accuracy at 1x and 4x) and on byte-level text (the builtin corpus, 128-byte windows; val
bits per byte on fixed held-out windows). Every variant gets the same steps and batches, so the
comparison is at an equal step budget (wall-clock is reported beside it).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hamt_recall import build_hamt, eval_set, evaluate, lr_at, parse_overrides, train  # noqa: E402
from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402
from memlm.datamodules.recall import RecallDataModule  # noqa: E402
from memlm.datamodules.sources import builtin_corpus  # noqa: E402

VARIANTS = [
    "base", "binding=circular", "n_slots=1", "n_slots=4", "n_slots=16", "key_source=position", "key_source=mix",
    "gate_mode=recurrent", "aux_weight=0", "tau_min=64",
]


def byte_corpus() -> tuple[np.ndarray, np.ndarray]:
    splits, _ = builtin_corpus()
    enc = lambda docs: np.frombuffer("\n\n".join(docs).encode("utf-8"), dtype=np.uint8).astype(np.int64)  # noqa: E731
    return enc(splits["train"]), enc(splits["val"])


def text_bpb(kw: dict, width: int, steps: int, batch: int, block: int, lr: float, seed: int, data, n_val: int) -> tuple[float, float]:
    """Train on random byte windows; (val bits per byte, train seconds)."""
    train_ids, val_ids = data
    torch.manual_seed(seed)
    model = build_hamt(256, width, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    spent = 0.0
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - block - 1, size=batch)
        seq = torch.from_numpy(np.stack([train_ids[s:s + block + 1] for s in starts]))
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr)
        t0 = time.perf_counter()
        out = model(seq[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 256), seq[:, 1:].reshape(-1))
        (loss + sum(out.aux_losses.values(), torch.zeros(()))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        spent += time.perf_counter() - t0
    model.eval()
    vstarts = np.linspace(0, len(val_ids) - block - 2, n_val).astype(np.int64)  # fixed held-out windows
    seq = torch.from_numpy(np.stack([val_ids[s:s + block + 1] for s in vstarts]))
    with torch.no_grad():
        nll = F.cross_entropy(model(seq[:, :-1]).logits.reshape(-1, 256), seq[:, 1:].reshape(-1))
    return float(nll) / math.log(2), spent


def mqar_acc(kw: dict, args) -> tuple[float, float, float]:
    p = args.pairs
    dm = RecallDataModule(task="mqar", seq_len=64, num_kv_pairs=p, num_keys=4 * p, num_values=4 * p, seed=7)
    torch.manual_seed(args.seed)
    model = build_hamt(dm.vocab_size, args.width, **kw)
    stats = train({"hamt": model}, dm, [32, 64], args.mqar_steps, args.batch_size, args.lr, torch.device("cpu"),
                  args.seed)
    accs = []
    for n in (64, 256):
        x, y = eval_set(dm, args.n_eval, n)
        accs.append(evaluate(model, x, y, torch.device("cpu"), batch=max(1, 2048 // n))[0])
    return accs[0], accs[1], stats["hamt"]["train_s"]


def plot(rows: list[dict], out_dir: Path, pairs: int = 8) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    y = np.arange(len(rows))
    axes[0].barh(y - 0.2, [r[f"mqar{pairs}_acc_1x"] for r in rows], 0.4, label="1x")
    axes[0].barh(y + 0.2, [r[f"mqar{pairs}_acc_4x"] for r in rows], 0.4, label="4x")
    axes[0].axvline(1 / (4 * pairs), color="k", ls=":", label="chance")
    axes[0].set_title(f"MQAR {pairs} pairs / {4 * pairs} keys: accuracy")
    axes[1].barh(y, [r["text_bpb"] for r in rows])
    axes[1].set_xlim(min(r["text_bpb"] for r in rows) * 0.95, max(r["text_bpb"] for r in rows) * 1.02)
    axes[1].set_title("builtin text: val bits per byte (lower is better)")
    for ax in axes:
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "hamt_ablation.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return str(p)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", nargs="*", default=None, help="'base' or key=value[,key=value] HAMTConfig overrides")
    ap.add_argument("--mqar-steps", type=int, default=None)
    ap.add_argument("--text-steps", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=8, help="MQAR key-value pairs (keys and values: 4 x pairs)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plot-dir", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.mqar_steps = args.mqar_steps or (150 if args.quick else 1000)
    args.text_steps = args.text_steps or (100 if args.quick else 600)
    args.n_eval = 32 if args.quick else 128
    variants = args.variants or VARIANTS
    data = byte_corpus()
    rows, figures = [], {}
    mq = f"mqar{args.pairs}"
    for v in variants:
        kw = {} if v == "base" else parse_overrides(v.split(","))
        acc1, acc4, mqar_s = mqar_acc(kw, args)
        bpb, text_s = text_bpb(kw, args.width, args.text_steps, args.batch_size, 128, args.lr, args.seed, data,
                               n_val=64 if args.quick else 256)
        rows.append({"variant": v, f"{mq}_acc_1x": round(acc1, 4), f"{mq}_acc_4x": round(acc4, 4),
                     "text_bpb": round(bpb, 4), "mqar_train_s": round(mqar_s, 1), "text_train_s": round(text_s, 1)})
        tag = v.replace("=", "_").replace(",", "+")
        figures.update({f"{tag}_{mq}_acc_1x": rows[-1][f"{mq}_acc_1x"], f"{tag}_{mq}_acc_4x": rows[-1][f"{mq}_acc_4x"],
                        f"{tag}_text_bpb": rows[-1]["text_bpb"]})
        print(rows[-1], flush=True)
    print(f"HAMT ablations at an equal step budget ({args.mqar_steps} MQAR steps, {args.text_steps} text steps)")
    print_table(rows, ["variant", f"{mq}_acc_1x", f"{mq}_acc_4x", "text_bpb", "mqar_train_s", "text_train_s"])
    settings = {"quick": args.quick, "mqar": {"pairs": args.pairs, "keys": 4 * args.pairs, "seq_len": 64, "curriculum": [32, 64],
                                              "steps": args.mqar_steps, "eval_sequences": args.n_eval},
                "text": {"corpus": "builtin (bytes)", "block": 128, "steps": args.text_steps},
                "width": args.width, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "threads": torch.get_num_threads()}
    if args.plot_dir:
        settings["plot"] = plot(rows, Path(args.plot_dir), args.pairs)
    print_result(figures, settings)
    return 0


if __name__ == "__main__":
    run_main(main)
