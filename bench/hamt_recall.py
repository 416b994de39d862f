"""Long-context recall: HAMT vs the matched transformer at 1x .. 32x the training length, and HAMT's capacity.

    python bench/hamt_recall.py [--quick] [--task passkey|mqar|capacity|all] [--steps N] [--plot-dir DIR]
                                [--hamt key=value ...]

Both models train in the same process, step for step interleaved, on the same freshly generated
batches (memlm.datamodules.recall), with the same optimiser and schedule. Affordable on CPU because:

- a **length curriculum** (``curriculum_length``): the first half of the steps trains at shorter
  lengths, where an answer sits close to its key, then at the full training length;
- passkey uses the **small filler** (3 characters absent from the key sentence) and 3-digit keys.

Evaluation uses fixed held-out sequences at every length. HAMT reads the whole sequence (constant
state). The transformer's window is its block size (= the training length): beyond it, each answer is
predicted from the last ``block_size`` tokens only, which is the honest comparison for a window-limited
model (``windowed_answer_logits``).

Capacity (``--task capacity``): HAMT alone, MQAR accuracy at the training length against the number of
pairs (4, 8, 16, 32; keys = 4 x pairs), and against slots at 8 pairs (full run only);
``capacity_pairs_at_50pct_hamt`` is where that curve crosses 50% (log-interpolated; 0 when it never
reaches it, the largest tested count when it never falls below).

RESULT keys are built as ``<task>_acc_<N>x_<model>``; the headline ones are passkey_acc_16x_hamt,
passkey_acc_16x_transformer, mqar8_acc_4x_hamt, mqar8_acc_4x_transformer and
capacity_pairs_at_50pct_hamt.

``--task bound`` (seconds, no training): the recall one slot could reach with exact random keys, against
the key dimension (64/128/256) and the number of pairs, and with decay (``slot_recall_bound``).

Metrics: MQAR accuracy = fraction of queries answered correctly (argmax at the answer position);
passkey exact match = every digit of the key right (greedy on teacher-forced digits, which equals greedy
generation of the key when all digits are right); passkey ``acc`` = exact match.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import MemLMError, run_main  # noqa: E402
from memlm.datamodules.recall import IGNORE, RecallDataModule, curriculum_length  # noqa: E402
from memlm.models.hamt.model import HAMTConfig, HAMTModel  # noqa: E402
from memlm.models.transformer import GPT, GPTConfig  # noqa: E402


def parse_overrides(items: list[str]) -> dict:
    """``["n_slots=16", "binding=circular"]`` -> HAMTConfig keyword arguments (typed like the defaults)."""
    out = {}
    defaults = HAMTConfig()
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(defaults, key):
            raise MemLMError(f"--hamt expects key=value with a HAMTConfig field, got {item!r}")
        kind = type(getattr(defaults, key))
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else (kind(value) if kind in (int, float) else value)
    return out


def build_hamt(vocab: int, width: int, **overrides) -> HAMTModel:
    # HAMT 4 layers x 15 d^2 = transformer 5 layers x 12 d^2 (non-embedding parameters)
    kw = dict(vocab_size=vocab, n_layer=4, n_embd=width, n_slots=8, tau_max=8192.0)
    kw.update(overrides)
    return HAMTModel(HAMTConfig(**kw))


def build_transformer(vocab: int, width: int, window: int) -> GPT:
    return GPT(GPTConfig(vocab_size=vocab, block_size=window, n_layer=5, n_head=4, n_embd=width))


def lr_at(step: int, total: int, base: float, warmup: int = 30) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, p))))


def train(models: dict, dm: RecallDataModule, lengths: list[int], steps: int, batch_size: int, lr: float, dev,
          seed: int = 0) -> dict:
    """Interleaved training on the same batches; returns per-model {"train_s", "final_loss"}."""
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95)) for k, m in models.items()}
    rng = np.random.default_rng(seed)
    spent = {k: 0.0 for k in models}
    losses = {k: [] for k in models}
    for step in range(steps):
        x, y = dm.make(rng, batch_size, curriculum_length(step, steps, lengths))
        xb, yb = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
        for k, m in models.items():
            for grp in opts[k].param_groups:
                grp["lr"] = lr_at(step, steps, lr)
            t0 = time.perf_counter()
            out = m(xb)
            loss = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), yb.reshape(-1), ignore_index=IGNORE)
            total = loss + sum(out.aux_losses.values(), torch.zeros((), device=dev))
            total.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            spent[k] += time.perf_counter() - t0
            losses[k].append(loss.item())
    return {k: {"train_s": spent[k], "final_loss": float(np.mean(losses[k][-20:]))} for k in models}


def windowed_answer_logits(model, x: torch.Tensor, y: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at every answer position from the last ``window`` tokens up to it: ([n_ans, V], targets [n_ans])."""
    rows, pos = torch.nonzero(y != IGNORE, as_tuple=True)
    if x.size(1) <= window:
        return model(x).logits[rows, pos], y[rows, pos]
    start = (pos - window + 1).clamp_min(0)
    idx = start[:, None] + torch.arange(window, device=x.device)[None]  # [n_ans, window]
    windows = x[rows[:, None], idx]
    logits = model(windows).logits
    return logits[torch.arange(len(pos), device=x.device), pos - start], y[rows, pos]


@torch.no_grad()
def evaluate(model, x: np.ndarray, y: np.ndarray, dev, batch: int, window: int | None = None) -> tuple[float, float]:
    """(per-answer-token accuracy, per-sequence exact match); ``window`` limits what the model sees."""
    model.eval()
    correct = total = seq_ok = 0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch]).to(dev)
        yb = torch.from_numpy(y[i:i + batch]).to(dev)
        if window is None:
            logits, tgt = model(xb).logits[yb != IGNORE], yb[yb != IGNORE]
        else:
            logits, tgt = windowed_answer_logits(model, xb, yb, window)
        hit = logits.argmax(-1) == tgt
        correct += int(hit.sum())
        total += int(hit.numel())
        # answers of a row are contiguous in the row-major nonzero order
        per_row = (yb != IGNORE).sum(1)
        ok = torch.stack([h.all() for h in hit.split(per_row.tolist())]) if len(per_row) else hit
        seq_ok += int(ok.sum())
    model.train()
    return correct / max(1, total), seq_ok / len(x)


def eval_set(dm: RecallDataModule, n: int, length: int):
    return dm.make(np.random.default_rng([dm.seed, 2, length]), n, length)


def run_recall(task: str, args, dev) -> tuple[list[dict], dict, dict]:
    """HAMT vs transformer on one task: (table rows, figures, settings)."""
    quick = args.quick
    if task == "mqar":
        pairs = args.kv_pairs or 8
        L = args.seq_len or 64
        dm = RecallDataModule(task="mqar", seq_len=L, num_kv_pairs=pairs, num_keys=4 * pairs, num_values=4 * pairs, seed=7)
        steps = args.steps or (200 if quick else 1500)
        factors = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32]
        name = f"mqar{pairs}"
        curriculum = [max(4 * pairs, L // 2), L]
    else:
        L = args.seq_len or 128
        dm = RecallDataModule(task="passkey", seq_len=L, max_key=args.max_key, filler="small", seed=7)
        steps = args.steps or (150 if quick else 1200)
        factors = [1, 4, 16, 32] if quick else [1, 2, 4, 8, 16, 32]
        name = "passkey"
        curriculum = [L // 2, L] if L >= 256 else [L]  # the key sentence and question alone take ~104 chars
    n_eval = 32 if quick else 128
    torch.manual_seed(args.seed)
    models = {"hamt": build_hamt(dm.vocab_size, args.width, **args.hamt_kw).to(dev),
              "transformer": build_transformer(dm.vocab_size, args.width, window=L).to(dev)}
    stats = train(models, dm, curriculum, steps, args.batch_size, args.lr, dev, seed=args.seed)
    rows, figures = [], {}
    for f in factors:
        n = f * L
        x, y = eval_set(dm, n_eval, n)
        row = {"task": name, "length": n, "x_train": f}
        for k, m in models.items():
            acc, exact = evaluate(m, x, y, dev, batch=max(1, 4096 // n), window=L if k == "transformer" else None)
            row[f"{k}_acc"], row[f"{k}_exact"] = round(acc, 4), round(exact, 4)
            score = exact if task == "passkey" else acc
            figures[f"{name}_acc_{f}x_{k}"] = round(score, 4)
            if task == "passkey":
                figures[f"{name}_digit_acc_{f}x_{k}"] = round(acc, 4)
        rows.append(row)
        print(row, flush=True)  # partial results survive an interrupted run
    for k, s in stats.items():
        figures[f"{name}_final_train_loss_{k}"] = round(s["final_loss"], 4)
        figures[f"{name}_train_s_{k}"] = round(s["train_s"], 1)
    settings = {"seq_len": L, "curriculum": curriculum, "steps": steps, "eval_sequences": n_eval,
                "transformer_window": L,
                "params_non_emb": {"hamt": models["hamt"].param_count(), "transformer": models["transformer"].num_params()}}
    if task == "mqar":
        settings.update(kv_pairs=pairs, keys=dm.num_keys, values=dm.num_values)
    else:
        settings.update(max_key=args.max_key, filler="small")
    return rows, figures, settings


def crossing(xs: list[int], accs: list[float], level: float = 0.5) -> float:
    """Where ``accs`` (over increasing ``xs``) first falls below ``level``, interpolated in log2(x)."""
    if accs[0] < level:
        return 0.0
    for (x0, a0), (x1, a1) in zip(zip(xs, accs), zip(xs[1:], accs[1:])):
        if a1 < level:
            t = (a0 - level) / max(1e-9, a0 - a1)
            return float(2 ** (math.log2(x0) + t * (math.log2(x1) - math.log2(x0))))
    return float(xs[-1])


def slot_recall_bound(dim: int, pairs: int, trials: int = 256, seed: int = 0, tau: float | None = None,
                      gap: int = 2) -> float:
    """Upper bound for one slot: ``pairs`` values (of a 4 x pairs codebook) bound to exact random
    bipolar keys and summed, optionally with decay ``1 - 1/tau`` per token (pair i written ``gap``
    tokens after pair i-1), then unbound with the right key and decoded to the nearest value.
    No learning is involved: this is what perfect keys could reach in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    codebook = F.normalize(torch.randn(4 * pairs, dim, generator=g), dim=-1)
    vid = torch.randint(0, 4 * pairs, (trials, pairs), generator=g)
    keys = torch.sign(torch.randn(trials, pairs, dim, generator=g))
    age = gap * torch.arange(pairs - 1, -1, -1, dtype=torch.float32)
    w = (1 - 1 / tau) ** age if tau else torch.ones(pairs)
    memory = (w[None, :, None] * codebook[vid] * keys).sum(1)
    decoded = ((memory[:, None] * keys) @ codebook.T).argmax(-1)
    return float((decoded == vid).float().mean())


def run_bound() -> tuple[list[dict], dict, dict]:
    rows, figures = [], {}
    for dim in (64, 128, 256):
        row = {"dim": dim}
        for pairs in (4, 8, 16, 32):
            row[f"pairs{pairs}"] = round(slot_recall_bound(dim, pairs), 3)
            figures[f"bound_acc_{pairs}pairs_dim{dim}"] = row[f"pairs{pairs}"]
        rows.append(row)
    for tau in (4, 12, 35, 100, 1000):
        figures[f"bound_acc_8pairs_dim64_tau{tau}"] = round(slot_recall_bound(64, 8, tau=tau), 3)
    return rows, figures, {"trials": 256, "keys": "exact random bipolar", "codebook": "4 x pairs values"}


def run_capacity(args, dev) -> tuple[list[dict], dict, dict]:
    quick = args.quick
    pair_counts = [4, 8, 16, 32]
    L = args.seq_len or 128  # 32 pairs and their queries need 127 tokens
    steps = args.steps or (100 if quick else 800)
    slot_counts = [] if quick else [1, 4, 8, 16]
    n_eval = 32 if quick else 128
    rows, figures = [], {}
    points = [(p, args.hamt_kw.get("n_slots", 8)) for p in pair_counts] + [(8, s) for s in slot_counts]
    seen = {}
    for pairs, slots in points:
        if (pairs, slots) in seen:
            continue
        dm = RecallDataModule(task="mqar", seq_len=L, num_kv_pairs=pairs, num_keys=4 * pairs, num_values=4 * pairs, seed=7)
        torch.manual_seed(args.seed)
        kw = dict(args.hamt_kw, n_slots=slots)
        model = build_hamt(dm.vocab_size, args.width, **kw).to(dev)
        stats = train({"hamt": model}, dm, [max(4 * pairs, L // 2), L], steps, args.batch_size, args.lr, dev, args.seed)
        x, y = eval_set(dm, n_eval, L)
        acc, _ = evaluate(model, x, y, dev, batch=32)
        seen[(pairs, slots)] = acc
        rows.append({"pairs": pairs, "keys": 4 * pairs, "slots": slots, "hamt_acc": round(acc, 4),
                     "chance": round(1 / (4 * pairs), 4), "train_s": round(stats["hamt"]["train_s"], 1)})
        figures[f"capacity_acc_{pairs}pairs_{slots}slots_hamt"] = round(acc, 4)
        print(rows[-1], flush=True)
    default_slots = args.hamt_kw.get("n_slots", 8)
    curve = [seen[(p, default_slots)] for p in pair_counts]
    figures["capacity_pairs_at_50pct_hamt"] = round(crossing(pair_counts, curve), 2)
    settings = {"seq_len": L, "steps": steps, "pairs": pair_counts, "slots": slot_counts or [default_slots],
                "eval_sequences": n_eval}
    return rows, figures, settings


def plot(recall_rows: list[dict], capacity_rows: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    tasks = sorted({r["task"] for r in recall_rows})
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            rs = [r for r in recall_rows if r["task"] == task]
            score = "exact" if task == "passkey" else "acc"
            for k in ("hamt", "transformer"):
                ax.plot([r["x_train"] for r in rs], [r[f"{k}_{score}"] for r in rs], "o-", label=k)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("evaluation length / training length")
            ax.set_ylabel("exact match" if task == "passkey" else "query accuracy")
            ax.set_title(task)
            ax.set_ylim(0, 1)
            ax.legend()
        fig.tight_layout()
        p = out_dir / "hamt_recall_lengths.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(str(p))
    if capacity_rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        slots = max((r["slots"] for r in capacity_rows), key=lambda s: sum(r["slots"] == s for r in capacity_rows))
        by_pairs = [r for r in capacity_rows if r["slots"] == slots]
        axes[0].plot([r["pairs"] for r in by_pairs], [r["hamt_acc"] for r in by_pairs], "o-", label=f"HAMT, {slots} slots")
        axes[0].plot([r["pairs"] for r in by_pairs], [r["chance"] for r in by_pairs], "k:", label="chance")
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("key-value pairs")
        axes[0].set_ylabel("MQAR accuracy (training length)")
        axes[0].set_ylim(0, 1)
        axes[0].legend()
        by_slots = sorted((r for r in capacity_rows if r["pairs"] == 8), key=lambda r: r["slots"])
        axes[1].plot([r["slots"] for r in by_slots], [r["hamt_acc"] for r in by_slots], "o-")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("slots (8 pairs)")
        axes[1].set_ylim(0, 1)
        fig.tight_layout()
        p = out_dir / "hamt_capacity.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(str(p))
    return paths


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--task", default="all", choices=["mqar", "passkey", "capacity", "bound", "all"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--kv-pairs", type=int, default=None, help="MQAR pairs (keys and values: 4 x pairs)")
    ap.add_argument("--max-key", type=int, default=999)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--hamt", nargs="*", default=[], help="HAMTConfig overrides, e.g. n_slots=16 tau_min=64")
    ap.add_argument("--plot-dir", default=None, help="write hamt_recall_lengths.png / hamt_capacity.png here")
    args = ap.parse_args()
    args.hamt_kw = parse_overrides(args.hamt)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tasks = ["bound", "passkey", "mqar", "capacity"] if args.task == "all" else [args.task]
    t0 = time.perf_counter()
    recall_rows, capacity_rows, bound_rows, figures = [], [], [], {}
    settings = {"quick": args.quick, "device": dev.type, "batch_size": args.batch_size, "lr": args.lr,
                "width": args.width, "threads": torch.get_num_threads(), "hamt_overrides": args.hamt_kw}
    for task in tasks:
        if task == "bound":
            rows, figs, sets = run_bound()
            bound_rows += rows
        elif task == "capacity":
            rows, figs, sets = run_capacity(args, dev)
            capacity_rows += rows
        else:
            rows, figs, sets = run_recall(task, args, dev)
            recall_rows += rows
        figures.update(figs)
        settings[task] = sets
    figures["wall_s"] = round(time.perf_counter() - t0, 1)
    if recall_rows:
        print("recall at N x the training length (transformer: window = block size = training length)")
        print_table(recall_rows, ["task", "length", "x_train", "hamt_acc", "transformer_acc", "hamt_exact",
                                  "transformer_exact"])
    if bound_rows:
        print("one slot with exact bipolar keys: recall of the stored value (upper bound, no learning)")
        print_table(bound_rows, ["dim", "pairs4", "pairs8", "pairs16", "pairs32"])
    if capacity_rows:
        print("HAMT capacity: MQAR accuracy at the training length")
        print_table(capacity_rows, ["pairs", "keys", "slots", "hamt_acc", "chance", "train_s"])
    if args.plot_dir:
        settings["plots"] = plot(recall_rows, capacity_rows, Path(args.plot_dir))
    print_result(figures, settings)
    return 0


if __name__ == "__main__":
    run_main(main)
