"""HTM speed: temporal-memory and spatial-pooler steps per second, learning on.

Temporal memory (the setting of htm.core's TM performance test): 2048 columns x 32 cells,
40 random active columns per step, a repeating set of 20 sequences x 50 steps (reset at the
start of each sequence), learning on, htm.core default parameters. htm.core's test asserts
its 6,000 steps (6 passes) finish in <= 3.3 s on its reference CPU (~1,800 steps/s).
Two drivers of the same algorithm run interleaved pass by pass: ``run`` (one compiled call
per sequence, what HTMLanguageModel uses) and ``compute`` (one Python call per step).

Spatial pooler: 2048 inputs -> 2048 columns, 2% active columns (global inhibition), random
inputs with 40 active bits, learning on and off interleaved.

Text (``--text``): the bounded-growth micro model (bench/htm_text.py ``BOUNDED``) learns
the first ``--chars`` characters of tinyshakespeare as one stream, learning on; prints
tokens per CPU-second against tokens seen (a table, and a PNG in docs/img/).

    python bench/htm_speed.py [--quick]
    python bench/htm_speed.py --text [--chars 1000000] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memlm.models.htm.spatial_pooler import SpatialPooler  # noqa: E402
from memlm.models.htm.temporal_memory import TemporalMemory  # noqa: E402
from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402


class Clock:
    """Wall and process CPU time (the CPU time is robust to other jobs on a shared machine)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w
        self.cpu = time.process_time() - self.c


def tm_pass_run(tm: TemporalMemory, seqs) -> np.ndarray:
    an = []
    for flat, off in seqs:
        tm.reset()
        an.append(tm.run(flat, off, learn=True).anomaly)
    return np.concatenate(an)


def tm_pass_compute(tm: TemporalMemory, seqs_steps) -> float:
    total = 0.0
    for steps in seqs_steps:
        tm.reset()
        for cols in steps:
            tm.compute(cols, learn=True)
            total += tm.anomaly
    return total


def text_main(args) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from htm_text import BOUNDED, SHAKESPEARE, build, plot_curve, rate, read_text, train_stream

    chars = args.chars or (100_000 if args.quick else 1_000_000)
    text = read_text(args.data or SHAKESPEARE)
    model = build(text)
    ids = np.asarray(model.tokenizer.encode(text[: chars + 1]), dtype=np.int64)
    rows = train_stream(model, ids, chunk=args.chunk)
    every = max(1, len(rows) // 20)
    print_table([r for i, r in enumerate(rows) if i % every == every - 1 or i == len(rows) - 1],
                ["tokens_seen", "tokens_per_cpu_s", "wall_s", "anomaly", "train_nll", "segments", "synapses"])
    png = args.png or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "img",
                                   "htm_text_speed.png")
    plot_curve(rows, png, f"HTM micro (bounded), tinyshakespeare first {len(ids) - 1:,} chars, learning on")
    total = rows[-1]["tokens_seen"]
    figures = {
        "tokens": total,
        "tokens_per_cpu_s": rate(rows),
        "tokens_per_cpu_s_first_100k": rate(rows, first=100_000),
        "tokens_per_cpu_s_last_100k": rate(rows, last=100_000),
        "min_chunk_tokens_per_cpu_s": min(r["tokens_per_cpu_s"] for r in rows),
        "final_segments": rows[-1]["segments"],
        "final_synapses": rows[-1]["synapses"],
        "final_anomaly": rows[-1]["anomaly"],
        "cpu_s": sum(r["cpu_s"] for r in rows),
    }
    print(f"\n{total:,} tokens: {figures['tokens_per_cpu_s']:.0f} tokens/CPU-s overall, "
          f"last 100k {figures['tokens_per_cpu_s_last_100k']:.0f}; curve in {png}")
    print_result(figures, {"text": "tinyshakespeare", "chars": chars, "chunk": args.chunk, "model": BOUNDED,
                           "quick": args.quick, "load_average": os.getloadavg()[0]})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer passes and SP steps (< 1 minute); with --text 100k chars")
    ap.add_argument("--text", action="store_true", help="tokens/s against tokens seen on real text, learning on")
    ap.add_argument("--chars", type=int, default=None, help="--text: characters to learn (default 1,000,000)")
    ap.add_argument("--chunk", type=int, default=2000, help="--text: tokens per process() call and curve point")
    ap.add_argument("--data", default=None, help="--text: the text file (default tinyshakespeare)")
    ap.add_argument("--png", default=None, help="--text: where the curve goes (default docs/img/htm_text_speed.png)")
    ap.add_argument("--passes", type=int, default=None, help="passes over the 20 sequences (default 6, quick 3)")
    ap.add_argument("--sp-steps", type=int, default=None, help="spatial pooler steps per mode (default 2000, quick 300)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.text:
        return text_main(args)
    passes = args.passes or (3 if args.quick else 6)
    sp_steps = args.sp_steps or (300 if args.quick else 2000)
    n_cols, cpc, n_active, n_seq, seq_len = 2048, 32, 40, 20, 50
    rng = np.random.default_rng(args.seed)
    steps = [[np.sort(rng.choice(n_cols, n_active, replace=False)).astype(np.int32) for _ in range(seq_len)]
             for _ in range(n_seq)]
    seqs = [(np.concatenate(s), np.arange(seq_len + 1, dtype=np.int64) * n_active) for s in steps]

    # compile outside the timings
    warm = TemporalMemory(64, 4, initial_segment_capacity=8, initial_synapse_capacity=8)
    warm.run(seqs[0][0] % 64, seqs[0][1])
    warm.compute(steps[0][0] % 64)
    SpatialPooler(64, 64).compute(np.arange(4))

    tm_run = TemporalMemory(n_cols, cpc, seed=args.seed + 1)
    tm_step = TemporalMemory(n_cols, cpc, seed=args.seed + 1)
    rows = []
    tot = {"run": [0.0, 0.0], "compute": [0.0, 0.0]}
    for p in range(passes):
        with Clock() as a:
            an = tm_pass_run(tm_run, seqs)
        with Clock() as b:
            tm_pass_compute(tm_step, steps)
        n = n_seq * seq_len
        tot["run"][0] += a.wall
        tot["run"][1] += a.cpu
        tot["compute"][0] += b.wall
        tot["compute"][1] += b.cpu
        rows.append({
            "bench": "TM 2048x32", "pass": p + 1, "anomaly": float(an.mean()),
            "run steps/s (cpu)": n / a.cpu, "compute steps/s (cpu)": n / b.cpu,
            "run steps/s (wall)": n / a.wall, "segments": tm_run.num_segments, "synapses": tm_run.num_synapses,
        })
    print_table(rows)
    total_steps = passes * n_seq * seq_len
    same = tm_run.num_synapses == tm_step.num_synapses and tm_run.num_segments == tm_step.num_segments
    print(f"\nTM, {total_steps} steps: run {total_steps / tot['run'][1]:.0f} steps/s (cpu), "
          f"compute {total_steps / tot['compute'][1]:.0f} steps/s (cpu), "
          f"run/compute speed ratio {tot['compute'][1] / tot['run'][1]:.2f}; same memory in both drivers: {same}")
    print(f"htm.core reference: 6000 steps <= 3.3 s (~1800 steps/s); this run, 6000-step equivalent: "
          f"{6000 * tot['run'][1] / total_steps:.2f} s cpu\n")

    sp = SpatialPooler(2048, 2048, density=0.02, boost_strength=1.0, seed=args.seed + 2)
    inputs = [np.sort(rng.choice(2048, 40, replace=False)).astype(np.int32) for _ in range(sp_steps)]
    flat = np.concatenate(inputs)
    off = np.arange(sp_steps + 1, dtype=np.int64) * 40
    sp_rows = []
    sp_tot = {True: 0.0, False: 0.0}
    half = sp_steps // 2
    for part in range(2):  # interleave learning on / off, two halves each
        sl = slice(part * half * 40, (part + 1) * half * 40)
        o = off[: half + 1]
        for learn in (True, False):
            with Clock() as c:
                cols, coff = sp.run(flat[sl], o, learn=learn)
            sp_tot[learn] += c.cpu
            sp_rows.append({"bench": "SP 2048->2048", "half": part + 1, "learn": learn,
                            "steps/s (cpu)": half / c.cpu, "steps/s (wall)": half / c.wall,
                            "active cols/step": float(np.diff(coff).mean())})
    print_table(sp_rows)
    sp_learn = 2 * half / sp_tot[True]
    sp_infer = 2 * half / sp_tot[False]
    print(f"\nSP: learning {sp_learn:.0f} steps/s, inference {sp_infer:.0f} steps/s (cpu), ratio {sp_infer / sp_learn:.1f}")

    figures = {
        "tm_steps_per_s_run_cpu": total_steps / tot["run"][1],
        "tm_steps_per_s_run_wall": total_steps / tot["run"][0],
        "tm_steps_per_s_compute_cpu": total_steps / tot["compute"][1],
        "tm_run_over_compute_speed": tot["compute"][1] / tot["run"][1],
        "tm_first_pass_steps_per_s_cpu": rows[0]["run steps/s (cpu)"],
        "tm_last_pass_steps_per_s_cpu": rows[-1]["run steps/s (cpu)"],
        "tm_final_anomaly": rows[-1]["anomaly"],
        "tm_seconds_per_6000_steps_cpu": 6000 * tot["run"][1] / total_steps,
        "htm_core_reference_steps_per_s": 1800.0,
        "sp_steps_per_s_learn_cpu": sp_learn,
        "sp_steps_per_s_infer_cpu": sp_infer,
    }
    settings = {"quick": args.quick, "passes": passes, "tm": "2048 cols x 32 cells, 40 active, 20 seq x 50 steps",
                "sp": "2048 -> 2048, 2% active, 40 active input bits", "sp_steps": sp_steps, "seed": args.seed,
                "load_average": os.getloadavg()[0]}
    print_result(figures, settings)
    return 0


if __name__ == "__main__":
    run_main(main)
