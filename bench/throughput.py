"""Training throughput of any config: Lightning vs the same model in a plain PyTorch loop.

    python bench/throughput.py --config configs/transformer_micro_shakespeare.yaml [--steps 40] [--rounds 3]
        [--threads 2] [--trainer cli|bare] [--profile 20] [--quick]

Both loops train the same architecture from the same initial weights on the same batches
(AdamW with the module's schedule, grad clipping, same precision). They run interleaved,
round by round, in one process.

- ``--trainer cli`` (default) times Lightning the way ``train.py`` builds it: the MemLM
  callbacks (checkpoints, throughput, progress, SLURM requeue) and a CSV logger. ``bare`` is a
  Trainer with no callbacks and no logger (the floor Lightning itself sets).
- A step is the interval between consecutive batch starts, so everything between two steps
  counts (hooks, logging, progress output, data fetch), in both loops.
- Each step is timed by the wall clock and by this process's CPU time. On a machine that other
  jobs share, the CPU-time ratio is the one to trust (other processes stretch wall time but
  not the CPU time this process spends); on an idle machine the two agree.
- ``--profile N``: after timing, N steps of each loop under ``torch.profiler``: the top ops by
  self CPU time, and how much of a step no op accounts for (Python: hooks, logging, loops).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.core.bench import measure_matmul_peak_flops, print_result, print_table  # noqa: E402
from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI  # noqa: E402
from memlm.core.errors import MemLMError, run_main  # noqa: E402


class StepClock:
    """Wall and CPU time between consecutive step starts, after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.wall, self.cpu = warmup, [], []
        self._marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        self._marks.append((time.perf_counter(), time.process_time()))
        if len(self._marks) > self.warmup + 1:
            (w0, c0), (w1, c1) = self._marks[-2], self._marks[-1]
            self.wall.append(w1 - w0)
            self.cpu.append(c1 - c0)


class _LightningClock(L.Callback):
    def __init__(self, clock: StepClock, device: torch.device) -> None:
        self.clock, self.device = clock, device

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.clock.mark()


class _LightningProfiler(L.Callback):
    """torch.profiler over global steps [start, start + n)."""

    def __init__(self, start: int, n: int) -> None:
        self.start, self.n, self.prof = start, n, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif trainer.global_step == self.start + self.n and self.prof is not None:
            self.wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)


def build(config: str, overrides: list[str], root: str):
    cli = MemLMCLI(
        L.LightningModule, L.LightningDataModule, run=False,
        args=["--config", config, f"--run.root={root}", "--run.logger=[csv]", *overrides],
    )
    return cli.model, cli.datamodule, cli


def lightning_trainer(cli, kind: str, steps: int, callbacks: list, accelerator: str, precision: str) -> L.Trainer:
    common = dict(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, accelerator=accelerator,
                  devices=1, precision=precision)
    if kind == "cli":  # exactly what train.py adds: checkpoints, throughput, progress, requeue, CSV logger
        return cli.instantiate_trainer(callbacks=callbacks, **common)
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, gradient_clip_val=cli.config.trainer.gradient_clip_val, **common)


def lightning_round(cli, model, dm, kind, steps, warmup, device, precision) -> StepClock:
    clock = StepClock(warmup)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    # one extra step: the last interval ends at the start of step steps + warmup + 1
    trainer = lightning_trainer(cli, kind, steps + warmup + 1, [_LightningClock(clock, device)], accelerator, precision)
    trainer.fit(model, datamodule=dm)
    return clock


def plain_round(model, loader, steps, warmup, device, precision, clip: float | None, clock: StepClock | None = None,
                profile_from: int | None = None):
    """The loop a user would write: forward, loss, backward, clip, AdamW step, LR schedule step."""
    model = model.to(device).train()
    opts = model.configure_optimizers()
    opt, sched = opts["optimizer"], opts["lr_scheduler"]["scheduler"]
    autocast = precision.startswith("bf16")
    it = iter(loader)
    prof = None
    for i in range(steps + warmup + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        if clock is not None:
            clock.mark()
        if profile_from is not None and i == profile_from:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
            t0 = time.perf_counter()
        if i == steps + warmup:
            break
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(batch["input_ids"])
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), batch["targets"].flatten())
            loss = loss + sum(out.aux_losses.values(), torch.zeros((), device=device))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if prof is not None:
        wall = time.perf_counter() - t0
        prof.__exit__(None, None, None)
        return prof, wall
    return None


def profile_summary(prof, wall: float, steps: int, label: str, top: int) -> dict:
    """Print the top ops by self CPU time; return per-step ms in ops and outside them."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    op_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    step_ms = wall * 1e3 / steps
    print(f"\n{label}: {step_ms:.2f} ms/step under the profiler, {op_ms:.2f} ms in ops, "
          f"{step_ms - op_ms:.2f} ms outside any op (Python: loop, hooks, logging)")
    print_table([{"op": e.key[:48], "calls/step": e.count / steps, "self_cpu_ms/step": e.self_cpu_time_total / 1e3 / steps}
                 for e in events[:top]])
    return {"ms_per_step": step_ms, "op_ms_per_step": op_ms, "outside_ops_ms_per_step": step_ms - op_ms,
            "top_ops": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 4) for e in events[:top]}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/transformer_micro_shakespeare.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="10 steps x 2 rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, help="default: the config's trainer.precision")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--trainer", choices=("cli", "bare"), default="cli",
                   help="cli: the trainer train.py builds (callbacks + CSV logger); bare: no callbacks, no logger")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N steps of each loop")
    p.add_argument("--top", type=int, default=12, help="ops listed per profile")
    p.add_argument("overrides", nargs="*", help="extra CLI overrides after --, e.g. -- --data.init_args.batch_size=8")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 10, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.config).is_file():
        raise MemLMError(f"config not found: {args.config}")
    torch.manual_seed(0)
    root = tempfile.mkdtemp(prefix="memlm-throughput-")
    try:
        model, dm, cli = build(args.config, args.overrides, root)
        precision = args.precision or str(cli.config.trainer.precision or "32-true")
        clip = cli.config.trainer.gradient_clip_val
        dm.setup("fit")
        model.set_tokenizer(dm.tokenizer) if hasattr(model, "set_tokenizer") else None
        init_state = copy.deepcopy(model.state_dict())
        device = torch.device(args.device)
        block, batch = dm.block_size, dm.batch_size
        tokens_per_step = block * batch

        lit, plain = StepClock(0), StepClock(0)
        for _ in range(args.rounds):  # interleaved rounds
            model.load_state_dict(init_state)
            c = lightning_round(cli, model, dm, args.trainer, args.steps, args.warmup, device, precision)
            lit.wall += c.wall
            lit.cpu += c.cpu
            model.load_state_dict(init_state)
            c = StepClock(args.warmup)
            plain_round(model, dm.train_dataloader(), args.steps, args.warmup, device, precision, clip, c)
            plain.wall += c.wall
            plain.cpu += c.cpu

        profiles = {}
        if args.profile:
            model.load_state_dict(init_state)
            pc = _LightningProfiler(args.warmup, args.profile)
            accelerator = "gpu" if device.type == "cuda" else "cpu"
            lightning_trainer(cli, args.trainer, args.warmup + args.profile + 1, [pc], accelerator,
                              precision).fit(model, datamodule=dm)
            profiles["lightning"] = profile_summary(pc.prof, pc.wall, args.profile, f"lightning ({args.trainer})", args.top)
            model.load_state_dict(init_state)
            prof, wall = plain_round(model, dm.train_dataloader(), args.profile, args.warmup, device, precision, clip,
                                     profile_from=args.warmup)
            profiles["plain_pytorch"] = profile_summary(prof, wall, args.profile, "plain_pytorch", args.top)
    finally:
        import os
        import shutil

        os.environ.pop(RUN_DIR_ENV, None)
        shutil.rmtree(root, ignore_errors=True)

    peak = measure_matmul_peak_flops(n=2048 if device.type == "cuda" else 1024, device=args.device,
                                     dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    fpt = model.flops_per_token(block) if hasattr(model, "flops_per_token") else None
    rows, figures = [], {}
    for name, clock in ((f"lightning_{args.trainer}", lit), ("plain_pytorch", plain)):
        # mean, not median: a step that logs or prints every N steps must count
        wall, cpu = statistics.fmean(clock.wall), statistics.fmean(clock.cpu)
        tps = tokens_per_step / wall
        mfu = tps * fpt / peak if fpt else None
        rows.append({"loop": name, "wall_ms/step": wall * 1e3, "cpu_ms/step": cpu * 1e3,
                     "median_wall_ms": statistics.median(clock.wall) * 1e3, "tokens_per_sec": tps,
                     "mfu": mfu if mfu else "n/a"})
        figures["lightning" if name.startswith("lightning") else name] = {
            "wall_s_per_step": wall, "cpu_s_per_step": cpu, "tokens_per_sec": tps, "mfu": mfu}
    ratio_wall = figures["lightning"]["wall_s_per_step"] / figures["plain_pytorch"]["wall_s_per_step"]
    ratio_cpu = figures["lightning"]["cpu_s_per_step"] / figures["plain_pytorch"]["cpu_s_per_step"]
    figures["plain_over_lightning"] = ratio_wall
    figures["plain_over_lightning_cpu"] = ratio_cpu
    figures["peak_flops_measured"] = peak
    figures["flops_per_token"] = fpt
    if profiles:
        figures["profile"] = profiles
    params = sum(p.numel() for p in model.parameters())
    print(f"\nconfig {args.config}: {params / 1e6:.2f}M params, block {block}, batch {batch}, precision {precision}, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} timed steps, trainer {args.trainer}")
    print_table(rows)
    print(f"framework overhead: plain/lightning tokens/s = {ratio_wall:.3f} by wall clock, {ratio_cpu:.3f} by CPU time "
          f"(measured matmul peak {peak / 1e9:.1f} GFLOP/s)")
    print_result(figures, {"config": args.config, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                           "precision": precision, "params": params, "trainer": args.trainer,
                           "threads": torch.get_num_threads(), "overrides": args.overrides})
    return 0


if __name__ == "__main__":
    run_main(main)
