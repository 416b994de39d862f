"""Long-context recall: MQAR and passkey accuracy at 1x, 4x and 16x the training length,
HAMT vs the transformer baseline of matched parameters, trained with the same budget.

    python bench/hamt_recall.py [--quick] [--task mqar|passkey|all] [--steps N]

Both models train in the same process, step for step interleaved, on the same freshly generated
batches (memlm.datamodules.recall: seeded MQAR / passkey generators), with the same optimiser settings.
Evaluation uses fixed held-out sequences at each length. HAMT reads any length (constant state);
the transformer sees the whole sequence with RoPE positions beyond its training length.

Metrics: MQAR accuracy = fraction of queries answered correctly (argmax at the answer position);
passkey exact match = every digit of the key predicted correctly (greedy, teacher-forced digits,
which equals greedy generation of the whole key when all digits are right).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memlm.datamodules.recall import RecallDataModule  # noqa: E402
from memlm.models.hamt.model import HAMTConfig, HAMTModel  # noqa: E402
from memlm.models.transformer import GPT, GPTConfig  # noqa: E402
from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402


def build(vocab: int, width: int, max_len: int, dev):
    # HAMT 4 layers x 15 d^2 = transformer 5 layers x 12 d^2 (non-embedding parameters)
    hamt = HAMTModel(HAMTConfig(vocab_size=vocab, n_layer=4, n_embd=width, n_slots=8, tau_max=8192.0)).to(dev)
    gpt = GPT(GPTConfig(vocab_size=vocab, block_size=max_len, n_layer=5, n_head=4, n_embd=width)).to(dev)
    return {"hamt": hamt, "transformer": gpt}


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, p))))


@torch.no_grad()
def evaluate(model, x: np.ndarray, y: np.ndarray, dev, batch: int) -> tuple[float, float]:
    """(per-answer-token accuracy, per-sequence exact match)."""
    model.eval()
    correct = total = seq_ok = 0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch]).to(dev)
        yb = torch.from_numpy(y[i:i + batch]).to(dev)
        pred = model(xb).logits.argmax(-1)
        mask = yb != -100
        hit = (pred == yb) & mask
        correct += int(hit.sum())
        total += int(mask.sum())
        seq_ok += int(((hit | ~mask).all(-1)).sum())
    model.train()
    return correct / max(1, total), seq_ok / len(x)


def run_task(task: str, args, dev) -> tuple[list[dict], dict]:
    quick = args.quick
    if task == "mqar":
        L = args.seq_len or 64
        dm = RecallDataModule(task="mqar", seq_len=L, num_kv_pairs=args.kv_pairs or 4,
                              num_keys=args.keys, num_values=args.keys, seed=7)
        steps = args.steps or (80 if quick else 600)
        n_eval, width = (32 if quick else 256), args.width
    else:
        L = args.seq_len or 256
        dm = RecallDataModule(task="passkey", seq_len=L, max_key=args.max_key, seed=7)
        steps = args.steps or (150 if quick else 1500)
        n_eval, width = (32 if quick else 128), args.width
    lengths = [L, 4 * L, 16 * L]
    models = build(dm.vocab_size, width, max(lengths), dev)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95)) for k, m in models.items()}
    rng = np.random.default_rng(0)
    train_time = {k: 0.0 for k in models}
    losses = {k: [] for k in models}
    for step in range(steps):
        x, y = dm.make(rng, args.batch_size, L)
        xb, yb = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
        for k, m in models.items():  # interleaved: same batch, same schedule
            for grp in opts[k].param_groups:
                grp["lr"] = lr_at(step, steps, args.lr)
            t0 = time.perf_counter()
            out = m(xb)
            loss = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), yb.reshape(-1), ignore_index=-100)
            total = loss + sum(out.aux_losses.values(), torch.zeros((), device=dev))
            total.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            train_time[k] += time.perf_counter() - t0
            losses[k].append(loss.item())
    rows, figures = [], {}
    for n in lengths:
        x, y = dm.eval_set(n) if n_eval >= dm.num_val else dm.make(np.random.default_rng([7, 2, n]), n_eval, n)
        x, y = x[:n_eval], y[:n_eval]
        row = {"task": task, "length": n, "x_train": n // L}
        for k, m in models.items():
            acc, exact = evaluate(m, x, y, dev, batch=max(1, 2048 // n))
            row[f"{k}_acc"] = acc
            row[f"{k}_exact"] = exact
            figures[f"{task}_{k}_acc_{n // L}x"] = round(acc, 4)
            figures[f"{task}_{k}_exact_{n // L}x"] = round(exact, 4)
        rows.append(row)
    for k in models:
        figures[f"{task}_{k}_final_train_loss"] = round(float(np.mean(losses[k][-20:])), 4)
        figures[f"{task}_{k}_train_s"] = round(train_time[k], 1)
    settings = {"seq_len": L, "steps": steps, "eval_sequences": n_eval, "width": width,
                "params_non_emb": {k: (m.param_count() if hasattr(m, "param_count") else m.num_params())
                                   for k, m in models.items()}}
    if task == "mqar":
        settings.update(kv_pairs=dm.num_kv_pairs, keys=dm.num_keys, values=dm.num_values)
    return rows, {"figures": figures, "settings": settings}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--task", default=None, choices=["mqar", "passkey", "all"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--kv-pairs", type=int, default=None)
    ap.add_argument("--keys", type=int, default=16, help="MQAR key and value vocabulary sizes")
    ap.add_argument("--max-key", type=int, default=50000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = args.task or ("mqar" if args.quick else "all")
    tasks = ["mqar", "passkey"] if task == "all" else [task]
    all_rows, figures, settings = [], {}, {"quick": args.quick, "device": dev.type, "batch_size": args.batch_size,
                                           "lr": args.lr, "threads": torch.get_num_threads()}
    for t in tasks:
        rows, res = run_task(t, args, dev)
        all_rows += rows
        figures.update(res["figures"])
        settings[t] = res["settings"]
    cols = ["task", "length", "x_train", "hamt_acc", "transformer_acc", "hamt_exact", "transformer_exact"]
    print("recall accuracy at 1x / 4x / 16x the training length (same training budget)")
    print_table(all_rows, cols)
    print_result(figures, settings)
    return 0


if __name__ == "__main__":
    run_main(main)
