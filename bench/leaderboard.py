"""Every architecture trained from scratch on the same text, in the same wall-clock budget.

    python bench/leaderboard.py [--quick] [--budget-min 10] [--threads 2] [--only transformer,hamt] [--reuse]
        [--baseline-steps 2000] [--data ../shared/data/tinyshakespeare/input.txt]

- Data: tinyshakespeare, first 90% train, last 10% val, char tokenizer (each
  ``configs/<arch>_micro_shakespeare.yaml`` holds its tuned settings and says how it was tuned).
- Each architecture trains in its own ``train.py`` process on the same threads for
  ``--budget-min`` minutes (:class:`memlm.callbacks.budget.WallClockBudget`: the LR decay follows
  the budget spent; snapshots at 1/4, 2/4, 3/4 and 4/4 of it).
- Scored afterwards, outside the budget: the last snapshot on the **full** val split (sequential
  windows; stateful models carry their state along contiguous streams) for the table: val loss
  (nats per char) and bits per byte, from the model's normalised next-token distribution. Every
  snapshot, the last included, is also scored on the first ``--curve-val-batches`` val batches
  for the plot's curve (one scoring along the whole curve). Scores are remembered in
  ``<work>/<arch>/snapshots/scores.json``.
- Generation: ms per new token after a 1,024-token prompt (cached decoding; a model with a
  shorter context crops the prompt to it), greedy, 32 tokens.
- Reference rows: nanoGPT's published CPU recipe (val loss 1.8857 after 2,000 iterations at
  4 layers, 4 heads, width 128, block 64, batch 12) and MemLM's transformer at the same dims,
  steps and learning rate (``NANOGPT_RECIPE``; ``--baseline-steps``, skipped by ``--quick`` unless given).
- Writes ``--out`` (Markdown table) and ``--plot`` (val bpb against wall time); the last line is
  ``RESULT <json>`` with each architecture's val_bpb, val_loss, tokens_per_sec, params and the
  Lightning tax ``plain_over_lightning`` (``--tax-steps`` steps of bench/throughput.py; 0 skips).

The Hebbian learner is not in the table: it learns from conversations with its own word
tokenizer (``ConversationDataModule``), not from character text, so it has no score on these bytes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import MemLMError, run_main  # noqa: E402

ARCHITECTURES = {  # name -> config; every one on the same data settings
    "transformer": "configs/transformer_micro_shakespeare.yaml",
    "transformer_wide": "configs/transformer_micro_shakespeare_wide.yaml",
    "hmst": "configs/hmst_micro_shakespeare.yaml",
    "hamt": "configs/hamt_micro_shakespeare.yaml",
    "htm": "configs/htm_micro_shakespeare.yaml",
    # HAMT at tiny size beside its matched transformer (issue: HAMT on real text at equal wall clock)
    "hamt_tiny": "configs/hamt_tiny_shakespeare.yaml",
    "hamt_tiny_baseline": "configs/hamt_tiny_shakespeare_baseline.yaml",
}
NANOGPT_REFERENCE = {"name": "nanoGPT CPU recipe (published)", "steps": 2000, "val_loss": 1.8857}
# the recipe's optimiser, pinned for the reference run: the transformer config's learning rate is
# tuned for the wall-clock budget (its header says how), the recipe row keeps nanoGPT's 1e-3 -> 1e-4
NANOGPT_RECIPE = ["--model.init_args.optimizer.learning_rate=1e-3", "--model.init_args.optimizer.min_lr_ratio=0.1",
                  "--model.init_args.optimizer.warmup_steps=100"]
SNAPSHOTS = 4


def selected(only: str | None, known, data: str) -> list[str]:
    """The ``--only`` names (all of ``known`` without it), after checking them and the data file."""
    if not Path(data).is_file():
        raise MemLMError(f"data file not found: {data}; pass --data PATH to tinyshakespeare's input.txt")
    names = list(known) if not only else [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MemLMError(f"unknown architecture {unknown[0]!r}; choose from {', '.join(known)}")
    return names


def data_args(path: str) -> list[str]:
    return [f"--data.init_args.files=[{path}]", "--data.init_args.source=files", "--data.init_args.val_fraction=0.1",
            "--data.init_args.test_fraction=0.0", "--data.init_args.tokenizer=char"]


def train(name: str, config: str, root: Path, data: str, threads: int, extra: list[str], log: Path) -> Path:
    """One train.py process; returns its run directory."""
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / config), "--run.root", str(root),
           f"--run.name={name}", "--run.version=version_0", "--run.logger=[csv]", f"--run.num_threads={threads}",
           "--trainer.enable_model_summary=false", *data_args(data), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MEMLM_QUIET": "1"}
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise MemLMError(f"{name} training failed (exit {rc}); see {log}: {' | '.join(tail)}")
    return root / name / "version_0"


def budget_args(minutes: float, snap_dir: Path) -> list[str]:
    return ["--trainer.max_steps=-1", "--trainer.max_epochs=-1", "--trainer.val_check_interval=null",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.callbacks+=memlm.callbacks.budget.WallClockBudget", f"--trainer.callbacks.minutes={minutes}",
            f"--trainer.callbacks.snapshots={SNAPSHOTS}", f"--trainer.callbacks.snapshot_dir={snap_dir}"]


def steps_and_tokens(run_dir: Path) -> tuple[int, float | None]:
    """Last logged step and the mean logged train/tokens_per_sec."""
    steps, tps = 0, []
    with open(run_dir / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("step"):
                steps = max(steps, int(row["step"]) + 1)
            if row.get("train/tokens_per_sec"):
                tps.append(float(row["train/tokens_per_sec"]))
    return steps, (sum(tps) / len(tps) if tps else None)


def evaluate(ckpt: Path, config: str, data: str, threads: int, max_val_batches: int | None = None) -> dict:
    """val loss / bpb of a checkpoint on the full val split (or its first ``max_val_batches``), plus its global step."""
    import lightning as L
    import torch

    import yaml

    from memlm.checkpoint import load_module
    from memlm.datamodules.text import TextDataModule

    torch.set_num_threads(threads)
    module = load_module(ckpt)
    init = dict(yaml.safe_load((ROOT / config).read_text())["data"]["init_args"])
    init.update(source="files", files=[data], val_fraction=0.1, test_fraction=0.0, tokenizer="char", max_val_batches=max_val_batches)
    dm = TextDataModule(**init)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    out = trainer.validate(module, datamodule=dm, verbose=False)[0]
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", 0))
    return {"val_loss": float(out["val/loss"]), "val_bpb": float(out["val/bpb"]), "step": step, "module": module,
            "datamodule": dm}


def score(ckpt: Path, config: str, data: str, threads: int, max_val_batches: int | None = None) -> dict:
    """:func:`evaluate` without the module, remembered in ``<snapshot dir>/scores.json`` (keyed by the
    checkpoint's name, size and mtime and the number of val batches), so that ``--reuse`` does not
    score an unchanged checkpoint twice (the HTM row takes ~13 minutes on the full split)."""
    cache_path = ckpt.parent / "scores.json"
    st = ckpt.stat()
    key = f"{ckpt.name}:{st.st_size}:{st.st_mtime_ns}:{max_val_batches}"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        res = evaluate(ckpt, config, data, threads, max_val_batches)
        cache[key] = {k: res[k] for k in ("val_loss", "val_bpb", "step")}
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache[key]


def load_for_generation(ckpt: Path, config: str, data: str):
    """The module and the (char) datamodule a checkpoint was scored with."""
    import yaml

    from memlm.checkpoint import load_module
    from memlm.datamodules.text import TextDataModule

    init = dict(yaml.safe_load((ROOT / config).read_text())["data"]["init_args"])
    init.update(source="files", files=[data], val_fraction=0.1, test_fraction=0.0, tokenizer="char")
    return load_module(ckpt), TextDataModule(**init)


def generation_ms_per_token(module, val_ids, context: int = 1024, new_tokens: int = 32) -> float:
    from memlm.core.sampling import SamplingParams

    prompt = [int(t) for t in val_ids[:context]]
    params = SamplingParams(max_new_tokens=new_tokens + 1, temperature=0.0, use_cache=True)
    it = module.generate(prompt, params)
    next(it)  # the first token pays for the prompt
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return (time.perf_counter() - t0) * 1e3 / max(1, n)


def param_counts(module) -> tuple[int, int]:
    from memlm.apps.run_info import parameter_counts

    counts = parameter_counts(module)
    if counts["total"] == 0 and callable(getattr(module, "num_learned_values", None)):  # HTM: synapses, not Parameters
        n = module.num_learned_values()
        return n, n
    return counts["total"], counts["active"]


def plot(curves: dict[str, list[tuple[float, float]]], path: Path, budget_min: float, val_batches: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot([x / 60 for x in xs], ys, marker="o", label=name)
    ax.set_xlabel("training wall time (min, 2-core CPU)")
    ax.set_ylabel(f"val bits per byte (first {val_batches} val batches)")
    ax.set_title(f"tinyshakespeare, char tokens, {budget_min:g} min per architecture")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], settings: str) -> str:
    cols = ["architecture", "params (total / active)", "steps", "tokens seen", "tokens/s", "val loss (nats)",
            "val bpb", "gen ms/token @1k"]
    lines = [settings, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        def f(key, fmt):
            v = r.get(key)
            return "n/a" if v is None else format(v, fmt)
        params = "n/a" if r.get("params") is None else f"{r['params'] / 1e6:.2f}M / {r['active_params'] / 1e6:.2f}M"
        lines.append(f"| {r['architecture']} | {params} | {f('steps', ',')} | {f('tokens_seen', ',')} | "
                     f"{f('tokens_per_sec', ',.0f')} | {f('val_loss', '.4f')} | {f('val_bpb', '.4f')} | {f('gen_ms_per_token', '.2f')} |")
    return "\n".join(lines) + "\n"


def finished_run(snap_dir: Path, budget_min: float) -> bool:
    """Whether ``snap_dir`` holds every snapshot of a finished run of this budget (its last one
    written within 5% of ``budget_min``)."""
    try:
        elapsed = json.loads((snap_dir / "budget_elapsed.json").read_text())
    except (OSError, ValueError):
        return False
    last = f"budget-{SNAPSHOTS}of{SNAPSHOTS}.ckpt"
    return (snap_dir / last).is_file() and abs(elapsed.get(last, -1.0) - 60 * budget_min) <= 0.05 * 60 * budget_min


def run_architecture(name, config, args, work: Path) -> tuple[dict, list[tuple[float, float]]]:
    snap_dir = work / name / "snapshots"
    if args.reuse and finished_run(snap_dir, args.budget_min):
        run_dir = work / name / "version_0"
        print(f"{name}: scoring the finished {args.budget_min:g}-minute run in {run_dir} (--reuse)", flush=True)
    else:
        run_dir = train(name, config, work, args.data, args.threads, budget_args(args.budget_min, snap_dir),
                        work / f"{name}.log")
    elapsed = json.loads((snap_dir / "budget_elapsed.json").read_text())
    steps, tps = steps_and_tokens(run_dir)
    curve, final, last_ckpt = [], None, None
    for k in range(1, SNAPSHOTS + 1):
        ckpt = snap_dir / f"budget-{k}of{SNAPSHOTS}.ckpt"
        if not ckpt.is_file():
            continue
        # the curve scores every snapshot the same way (the first --curve-val-batches batches);
        # the table scores the last one on the full split
        curve.append((elapsed[ckpt.name], score(ckpt, config, args.data, args.threads, args.curve_val_batches)["val_bpb"]))
        last_ckpt = ckpt
    if last_ckpt is None or last_ckpt.name != f"budget-{SNAPSHOTS}of{SNAPSHOTS}.ckpt":
        raise MemLMError(f"{name} wrote no final budget snapshot in {snap_dir}; see {work / (name + '.log')}")
    final = score(last_ckpt, config, args.data, args.threads, None)
    module, dm = load_for_generation(last_ckpt, config, args.data)
    total, active = param_counts(module)
    row = {"architecture": name, "params": total, "active_params": active, "steps": final["step"],
           "tokens_seen": final["step"] * dm.batch_size * dm.block_size, "tokens_per_sec": tps,
           "val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
           "gen_ms_per_token": generation_ms_per_token(module, dm.split_ids("val"))}
    return row, curve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 minute per architecture, no baseline run, no tax run")
    p.add_argument("--budget-min", type=float, default=10.0, help="training minutes per architecture")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(ARCHITECTURES))
    p.add_argument("--baseline-steps", type=int, default=None, help="MemLM transformer at the nanoGPT recipe for N steps "
                   "(default 2000; 0 with --quick)")
    p.add_argument("--tax-steps", type=int, default=None, help="steps per round of the Lightning-tax measurement "
                   "(default 100; 0 with --quick)")
    p.add_argument("--tax-rounds", type=int, default=5, help="interleaved rounds of the Lightning-tax measurement "
                   "(its spread between runs on this 2-vCPU machine is several percent; more rounds narrow it)")
    p.add_argument("--curve-val-batches", type=int, default=16, help="val batches scoring the earlier snapshots "
                   "(the plot's curve; the last snapshot is scored on the full split)")
    p.add_argument("--reuse", action="store_true", help="score an architecture's finished run of the same budget in "
                   "<work> instead of training it again (e.g. after an interrupted leaderboard)")
    p.add_argument("--data", default=str((ROOT / "../shared/data/tinyshakespeare/input.txt").resolve()))
    p.add_argument("--work", default=None, help="run folder (default: runs/leaderboard)")
    p.add_argument("--out", default=None, help="Markdown table (default: <work>/leaderboard.md)")
    p.add_argument("--plot", default=None, help="PNG plot (default: <work>/leaderboard.png)")
    args = p.parse_args()
    if args.quick:
        args.budget_min = 1.0 if args.budget_min == 10.0 else args.budget_min
    baseline_steps = args.baseline_steps if args.baseline_steps is not None else (0 if args.quick else 2000)
    tax_steps = args.tax_steps if args.tax_steps is not None else (0 if args.quick else 100)
    names = selected(args.only, ARCHITECTURES, args.data)
    work = Path(args.work or ROOT / "runs" / "leaderboard")
    work.mkdir(parents=True, exist_ok=True)

    rows, curves, figures = [], {}, {}
    for name in names:
        t0 = time.perf_counter()
        row, curve = run_architecture(name, ARCHITECTURES[name], args, work)
        print(f"{name}: val loss {row['val_loss']:.4f}, bpb {row['val_bpb']:.4f} "
              f"({time.perf_counter() - t0:.0f} s incl. evaluation)", flush=True)
        rows.append(row)
        curves[name] = curve
        figures[name] = {k: row[k] for k in ("val_bpb", "val_loss", "tokens_per_sec", "steps")} | {
            "params": row["params"], "active_params": row["active_params"], "gen_ms_per_token": row["gen_ms_per_token"]}

    rows.append({"architecture": f"{NANOGPT_REFERENCE['name']}, {NANOGPT_REFERENCE['steps']:,} steps",
                 "steps": NANOGPT_REFERENCE["steps"], "tokens_seen": NANOGPT_REFERENCE["steps"] * 12 * 64,
                 "val_loss": NANOGPT_REFERENCE["val_loss"]})
    if baseline_steps:
        name = "transformer_nanogpt_recipe"
        run_dir = work / name / "version_0"
        last = run_dir / "checkpoints" / "last.ckpt"
        if not (args.reuse and last.is_file() and score(last, ARCHITECTURES["transformer"], args.data, args.threads)["step"]
                == baseline_steps):
            run_dir = train(name, ARCHITECTURES["transformer"], work, args.data, args.threads,
                            [f"--trainer.max_steps={baseline_steps}", f"--model.init_args.optimizer.max_steps={baseline_steps}",
                             "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", *NANOGPT_RECIPE],
                            work / f"{name}.log")
        res = score(last, ARCHITECTURES["transformer"], args.data, args.threads)
        _, tps = steps_and_tokens(run_dir)
        total, active = param_counts(load_for_generation(last, ARCHITECTURES["transformer"], args.data)[0])
        rows.append({"architecture": f"MemLM transformer, nanoGPT recipe, {baseline_steps:,} steps", "params": total,
                     "active_params": active, "steps": res["step"], "tokens_seen": res["step"] * 12 * 64,
                     "tokens_per_sec": tps, "val_loss": res["val_loss"], "val_bpb": res["val_bpb"]})
        figures["transformer_nanogpt_recipe"] = {"val_loss": res["val_loss"], "val_bpb": res["val_bpb"],
                                                 "steps": res["step"], "tokens_per_sec": tps, "params": total}
    if tax_steps:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--config", ARCHITECTURES["transformer"],
                              "--steps", str(tax_steps), "--rounds", str(args.tax_rounds), "--threads", str(args.threads)],
                             cwd=ROOT, capture_output=True, text=True)
        result = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if result:
            tax = json.loads(result[-1][len("RESULT "):])["figures"]
            figures["plain_over_lightning"] = tax["plain_over_lightning"]
            figures["plain_over_lightning_cpu"] = tax["plain_over_lightning_cpu"]

    settings = (f"tinyshakespeare (first 90% train, last 10% val), char tokens, {args.budget_min:g} min of training per "
                f"architecture on {args.threads} threads; val scored on the full split. Command: "
                f"`python bench/leaderboard.py{' --quick' if args.quick else ''} --budget-min {args.budget_min:g}`")
    out_md = Path(args.out or work / "leaderboard.md")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(markdown(rows, settings))
    plot(curves, Path(args.plot or work / "leaderboard.png"), args.budget_min, args.curve_val_batches)
    print()
    print_table([{k: v for k, v in r.items() if k != "active_params"} for r in rows])
    print(f"\ntable: {out_md}\nplot: {args.plot or work / 'leaderboard.png'}")
    print_result(figures, {"budget_min": args.budget_min, "threads": args.threads, "quick": args.quick,
                           "architectures": names, "baseline_steps": baseline_steps, "data": args.data})
    return 0


if __name__ == "__main__":
    run_main(main)
