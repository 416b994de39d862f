"""Shared driver of the HTM text benchmarks (htm_speed.py --text, htm_lm.py): one stream of
characters through HTMLanguageModel.process with learning on, timed chunk by chunk."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memlm.core.errors import MemLMError  # noqa: E402
from memlm.core.tokenizer import build_tokenizer  # noqa: E402
from memlm.lightning_modules.htm.module import HTMLanguageModel  # noqa: E402

SHAKESPEARE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                           "tinyshakespeare", "input.txt")

# the bounded-growth micro configuration (docs/htm.md "Steady throughput"): htm_micro's columns
# with 8 cells each and a per-cell segment limit of 4 that binds within the first 10k tokens,
# so the synapse count (and a step's cost, which follows it) stops growing; configs/htm_micro.yaml
# and configs/htm_micro_shakespeare.yaml use exactly this model
BOUNDED = dict(encoder_size=1024, encoder_active_bits=40, columns=1024, sp_density=0.04, cells_per_column=8,
               predicted_segment_decrement=0.004, max_segments_per_cell=4)


def read_text(path: str) -> str:
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise MemLMError(f"{path} not found; pass --data PATH to a text file")
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def build(text: str, **overrides) -> HTMLanguageModel:
    tok = build_tokenizer("char", [text])
    model = HTMLanguageModel(vocab_size=tok.vocab_size, **{**BOUNDED, **overrides})
    model.tokenizer = tok
    return model


def train_stream(model: HTMLanguageModel, ids: np.ndarray, chunk: int = 2000, cpu_budget: float | None = None,
                 log=None) -> list[dict]:
    """Learn ``ids`` as one stream (each token predicted, then learned). Stops at the end or once
    the process CPU time spent here passes ``cpu_budget``. One row per chunk."""
    model.process(ids[:2], ids[1:3], learn=False)  # compile outside the timings (learning off: no state change)
    rows, seen, cpu_total = [], 0, 0.0
    for start in range(0, len(ids) - 1, chunk):
        x = ids[start : start + chunk]
        y = ids[start + 1 : start + chunk + 1]
        x = x[: len(y)]
        c0, w0 = time.process_time(), time.perf_counter()
        nll, _, anomaly, _ = model.process(x, y, learn=True)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        seen += len(x)
        cpu_total += cpu
        rows.append({"tokens_seen": seen, "tokens": len(x), "cpu_s": cpu, "wall_s": wall,
                     "tokens_per_cpu_s": len(x) / max(cpu, 1e-9), "train_nll": float(nll.mean()),
                     "anomaly": float(anomaly.mean()), "segments": model.tm.num_segments,
                     "synapses": model.tm.num_synapses})
        if log is not None:
            log(rows[-1])
        if cpu_budget is not None and cpu_total >= cpu_budget:
            break
    return rows


def rate(rows: list[dict], first: int | None = None, last: int | None = None) -> float:
    """Tokens per CPU-second over the first / last N tokens trained (whole chunks)."""
    if first is not None:
        sel = [r for r in rows if r["tokens_seen"] <= first] or rows[:1]
    elif last is not None:
        end = rows[-1]["tokens_seen"]
        sel = [r for r in rows if r["tokens_seen"] - r["tokens"] >= end - last] or rows[-1:]
    else:
        sel = rows
    return sum(r["tokens"] for r in sel) / max(sum(r["cpu_s"] for r in sel), 1e-9)


def plot_curve(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([r["tokens_seen"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(x, [r["tokens_per_cpu_s"] for r in rows], lw=1, label="tokens / CPU-s (chunk)")
    ax.axhline(1000, color="grey", ls="--", lw=0.8, label="target 1,000")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("tokens per CPU-second")
    ax2 = ax.twinx()
    ax2.plot(x, [r["synapses"] / 1e6 for r in rows], color="tab:orange", lw=1, label="synapses (M)")
    ax2.set_ylabel("synapses (millions)")
    ax.set_title(title, fontsize=9)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
