"""A local picture of what a W&B dashboard will show, drawn from an offline run's own files.

    python -m memlm.apps.wandb_preview RUN_DIR [--out preview.png] [--max-charts 12]

RUN_DIR is a MemLM run directory (``runs/<name>/<version>``), its ``wandb/`` folder, or one
``offline-run-*`` folder (the newest is taken when there are several). The preview draws, from the
run file (``run-<id>.wandb``) and its ``files/media``: the run's group and tags, a line chart per
scalar history key (against ``trainer/global_step``), the last value of every histogram key, and
the last image of every image key. Nothing is uploaded; ``wandb sync <offline-run folder>`` does
that when a network is there.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from memlm.apps.wandb_offline import history_rows, wandb_records
from memlm.core.errors import MemLMError, run_main


def find_run(path: Path) -> Path:
    """The ``run-<id>.wandb`` file under ``path``."""
    path = Path(path)
    if not path.exists():
        raise MemLMError(f"no such run directory: {path}")
    if path.is_file() and path.suffix == ".wandb":
        return path
    files = sorted(path.glob("run-*.wandb")) or sorted(path.glob("offline-run-*/run-*.wandb")) \
        or sorted(path.glob("wandb/offline-run-*/run-*.wandb"))
    if not files:
        raise MemLMError(f"no offline W&B run under {path} (expected wandb/offline-run-*/run-<id>.wandb)")
    return files[-1]


def collect(run_file: Path) -> dict:
    """``{"group", "tags", "scalars": {key: [(step, value)]}, "histograms": {key: (step, bins, counts)},
    "images": {key: (step, path)}}`` from one offline run."""
    group, tags = None, []
    for rec in wandb_records(run_file):
        if rec.WhichOneof("record_type") == "run":
            group, tags = rec.run.run_group or None, list(rec.run.tags)
    scalars: dict[str, list] = {}
    histograms: dict[str, tuple] = {}
    images: dict[str, tuple] = {}
    for row in history_rows(run_file):
        step = row.get("trainer/global_step", row.get("_step"))
        for key, value in row.items():
            if key.startswith("_") or key in ("trainer/global_step", "epoch"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars.setdefault(key, []).append((step, float(value)))
            elif isinstance(value, dict) and value.get("_type") == "histogram":
                histograms[key] = (step, value["bins"], value["values"])
            elif isinstance(value, dict) and value.get("_type") in ("images/separated", "image-file"):
                name = value.get("filenames", [value.get("path")])[0]
                images[key] = (step, run_file.parent / "files" / name)
    return {"group": group, "tags": tags, "scalars": scalars, "histograms": histograms, "images": images}


def _chart_order(key: str) -> tuple:
    """Loss curves first, then the other train/ and val/ metrics, then the rest (alphabetical)."""
    first = ("train/loss", "val/loss", "val/bpb")
    if key in first:
        return (0, first.index(key))
    return (1 if key.split("/")[0] in ("train", "val") else 2, key)


def render(run: dict, out: Path, title: str, max_charts: int = 12) -> list[str]:
    """Draw the panels; returns their titles in order."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    panels = [("scalar", k) for k in sorted(run["scalars"], key=_chart_order)[:max_charts]]
    panels += [("histogram", k) for k in sorted(run["histograms"])]
    panels += [("image", k) for k in sorted(run["images"])]
    if not panels:
        raise MemLMError("the run has no history rows yet (was it started with --run.logger=[wandb]?)")
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (kind, key) in zip(axes.flat, panels):
        if kind == "scalar":
            steps, values = zip(*run["scalars"][key])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            ax.set_xlabel("trainer/global_step")
        elif kind == "histogram":
            step, bins, counts = run["histograms"][key]
            ax.stairs(counts, bins, fill=True)
            key = f"{key} (step {step})"
        else:
            step, path = run["images"][key]
            ax.imshow(mpimg.imread(str(path)))
            ax.axis("off")
            key = f"{key} (step {step})"
        ax.set_title(key, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    tags = ", ".join(run["tags"]) or "no tags"
    fig.suptitle(f"{title} - group {run['group']} - {tags}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return [k for _, k in panels]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: <offline-run folder>/preview.png)")
    p.add_argument("--max-charts", type=int, default=12, help="scalar charts drawn (losses first)")
    args = p.parse_args(argv)
    run_file = find_run(args.run_dir)
    out = args.out or run_file.parent / "preview.png"
    panels = render(collect(run_file), out, run_file.parent.name, args.max_charts)
    print(f"{out}: {len(panels)} panels")
    return 0


if __name__ == "__main__":
    run_main(main)
