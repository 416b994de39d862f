"""Plot training curves of one or more runs from their ``metrics.csv`` (no W&B needed).

    python -m memlm.plot runs/transformer_micro/version_0 runs/hamt_micro/version_0 --out curves.png

Draws loss (train and val) and bits per byte (val, and train where logged) against the
optimizer step and against wall time, one colour per run. Wall time comes from
``train/elapsed_s``, which the progress callback logs; evaluation rows get the time of the
surrounding training steps by interpolation. A run directory may be given as the folder
that holds ``metrics.csv`` or any parent of it (e.g. ``runs/transformer_micro``: every
version below it).
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from memlm.core.errors import MemLMError, run_main

SERIES = (("train/loss", "val/loss"), ("train/bpb", "val/bpb"))


def find_metrics(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file() and path.name == "metrics.csv":
        return [path]
    if not path.exists():
        raise MemLMError(f"run directory not found: {path}")
    found = sorted(path.rglob("metrics.csv"))
    if not found:
        raise MemLMError(f"no metrics.csv under {path}: train with --run.logger '[csv]' (or add csv to the loggers)")
    return found


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """column -> [(step, value)] for every numeric cell."""
    out: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                step = float(row.get("step") or "nan")
            except ValueError:
                continue
            if math.isnan(step):
                continue
            for key, cell in row.items():
                if key in ("step", "epoch") or not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    out.setdefault(key, []).append((step, value))
    for key in out:
        out[key].sort()
    return out


def label_for(metrics_csv: Path) -> str:
    # runs/<name>/<version>/metrics.csv -> <name>/<version>
    parts = metrics_csv.parent.parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(metrics_csv.parent)


def wall_times(metrics: dict, steps: list[float]) -> list[float] | None:
    import numpy as np

    clock = metrics.get("train/elapsed_s")
    if not clock:
        return None
    s, t = zip(*clock)
    return list(np.interp(steps, s, t))


def plot(run_dirs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label_for(p), read_metrics(p)) for d in run_dirs for p in find_metrics(d)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drew = False
    for i, (label, metrics) in enumerate(runs):
        colour = colours[i % len(colours)]
        for row, keys in enumerate(SERIES):
            for key in keys:
                points = metrics.get(key)
                if not points:
                    continue
                steps, values = zip(*points)
                style = "-" if key.startswith("val/") else ":"
                name = f"{label} {key.split('/')[0]}"
                axes[row][0].plot(steps, values, style, color=colour, label=name, marker="o" if key.startswith("val/") else ".",
                                  markersize=3)
                times = wall_times(metrics, list(steps))
                if times is not None:
                    axes[row][1].plot(times, values, style, color=colour, label=name,
                                      marker="o" if key.startswith("val/") else ".", markersize=3)
                drew = True
    if not drew:
        raise MemLMError("the metrics.csv files hold no loss or bpb values yet")
    for row, ylabel in enumerate(("loss (nats/token)", "bits per byte")):
        axes[row][0].set_xlabel("optimizer step")
        axes[row][1].set_xlabel("wall time (s)")
        for col in range(2):
            axes[row][col].set_ylabel(ylabel)
            axes[row][col].grid(alpha=0.3)
            if axes[row][col].lines:
                axes[row][col].legend(fontsize=7)
    fig.suptitle(title or "MemLM runs")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m memlm.plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (or their parents) holding metrics.csv")
    p.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    out = plot(args.runs, args.out, args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
