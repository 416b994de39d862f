"""The leaderboard's tuning sweep: a few settings per architecture, each trained for a short
wall-clock budget on the leaderboard's data, scored on the same val batches.

    python bench/leaderboard_sweep.py [--budget-min 2] [--threads 1] [--parallel 2] [--only hmst,hamt]
        [--out docs/leaderboard_sweep.md]

- Same data, tokenizer, splits and budget mechanics as ``bench/leaderboard.py`` (its ``train``
  and ``score``): every run is a ``train.py`` process with
  :class:`memlm.callbacks.budget.WallClockBudget`, so its LR decay follows its budget.
- Every setting of one architecture runs under the same conditions (``--threads`` each,
  ``--parallel`` runs at a time), so the ranking inside an architecture is fair even when the
  absolute numbers are not the leaderboard's (which trains for 10 minutes on 2 threads).
- Scored on the first ``--val-batches`` val batches (sequential windows), as the leaderboard's curve.
- A short budget favours settings that learn fast (a higher learning rate); the table says so,
  and a setting is only carried into a leaderboard config when it also holds at the full budget.

The last line is ``RESULT <json>``: per architecture, the best setting and its val bpb, and every
setting's bpb.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from leaderboard import ARCHITECTURES, budget_args, score, selected, steps_and_tokens, train  # noqa: E402

from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import MemLMError, run_main  # noqa: E402

LR = "--model.init_args.optimizer.learning_rate"
# architecture -> {setting name: train.py overrides}; the first entry is the config as committed
GRID: dict[str, dict[str, list[str]]] = {
    # the committed configs carry the first sweep's winners (docs/leaderboard_sweep.md), so each grid
    # is now centred on them: a rerun checks the neighbours
    "transformer": {"lr 2e-3 (config)": [], "lr 1e-3": [f"{LR}=1e-3"], "lr 4e-3": [f"{LR}=4e-3"]},
    "hamt": {"lr 6e-3 (config)": [], "lr 3e-3": [f"{LR}=3e-3"], "lr 1.2e-2": [f"{LR}=1.2e-2"]},
    "hmst": {"lr 3e-3 (config)": [], "lr 1.5e-3": [f"{LR}=1.5e-3"], "lr 6e-3": [f"{LR}=6e-3"]},
    "htm": {"classifier alpha 0.5 (config)": [], "classifier alpha 0.25": ["--model.init_args.classifier_alpha=0.25"],
            "classifier alpha 1.0": ["--model.init_args.classifier_alpha=1.0"]},
}


def run_one(arch: str, index: int, setting: str, extra: list[str], args, work: Path) -> dict:
    name = f"{arch}__{index}"
    snap = work / name / "snapshots"
    t0 = time.perf_counter()
    run_dir = train(name, ARCHITECTURES[arch], work, args.data, args.threads,
                    budget_args(args.budget_min, snap) + extra, work / f"{name}.log")
    steps, tps = steps_and_tokens(run_dir)
    last = snap / "budget-4of4.ckpt"
    if not last.is_file():
        raise MemLMError(f"{name} wrote no final snapshot; see {work / (name + '.log')}")
    res = score(last, ARCHITECTURES[arch], args.data, args.threads, args.val_batches)
    row = {"architecture": arch, "setting": setting, "steps": res["step"], "tokens_per_sec": round(tps or 0),
           "val_loss": round(res["val_loss"], 4), "val_bpb": round(res["val_bpb"], 4),
           "wall_s": round(time.perf_counter() - t0)}
    print(row, flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-min", type=float, default=2.0, help="training minutes per setting")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (threads x parallel <= cores)")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(GRID))
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--data", default=str((ROOT / "../shared/data/tinyshakespeare/input.txt").resolve()))
    p.add_argument("--work", default=None, help="run folder (default: runs/leaderboard_sweep)")
    p.add_argument("--out", default=None, help="Markdown table (default: <work>/sweep.md)")
    args = p.parse_args()
    names = selected(args.only, GRID, args.data)
    work = Path(args.work or ROOT / "runs" / "leaderboard_sweep")
    work.mkdir(parents=True, exist_ok=True)
    jobs = [(a, i, s, extra) for a in names for i, (s, extra) in enumerate(GRID[a].items())]
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:  # each job is its own train.py process
        rows = list(pool.map(lambda job: run_one(*job, args, work), jobs))
    figures = {}
    for arch in names:
        mine = [r for r in rows if r["architecture"] == arch]
        best = min(mine, key=lambda r: r["val_bpb"])
        for r in mine:
            r["best"] = "yes" if r is best else ""
        figures[arch] = {"best": best["setting"], "best_val_bpb": best["val_bpb"],
                         "settings": {r["setting"]: r["val_bpb"] for r in mine}}
    cols = ["architecture", "setting", "steps", "tokens_per_sec", "val_loss", "val_bpb", "best"]
    print_table(rows, cols)
    head = (f"Tuning sweep: {args.budget_min:g} min per setting, {args.threads} thread(s) each, {args.parallel} at a time, "
            f"val bpb on the first {args.val_batches} val batches. Command: `python bench/leaderboard_sweep.py "
            f"--budget-min {args.budget_min:g} --threads {args.threads} --parallel {args.parallel}`")
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    out = Path(args.out or work / "sweep.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"table: {out}")
    print_result(figures, {"budget_min": args.budget_min, "threads": args.threads, "parallel": args.parallel,
                           "val_batches": args.val_batches, "data": args.data})
    return 0


if __name__ == "__main__":
    run_main(main)
