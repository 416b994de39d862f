"""Training throughput of any config: Lightning vs the same model in a plain PyTorch loop.

    python bench/throughput.py --config configs/transformer_tiny.yaml [--steps 20] [--rounds 3] [--quick]

Both loops train the same architecture from the same initial weights on the same batches
(AdamW, grad clipping, same precision). They run interleaved, round by round, in one
process; the table shows tokens/s, MFU and the framework-overhead ratio plain/Lightning.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.core.bench import measure_matmul_peak_flops, print_result, print_table  # noqa: E402
from memlm.apps.cli import MemLMCLI  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def build(config: str, overrides: list[str]):
    cli = MemLMCLI(
        L.LightningModule, L.LightningDataModule, run=False,
        args=["--config", config, "--run.logger=[none]", "--trainer.enable_checkpointing=false", *overrides],
    )
    return cli.model, cli.datamodule, cli


def lightning_round(model, dm, steps, warmup, accelerator, precision) -> list[float]:
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=steps + warmup, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], gradient_clip_val=1.0,
    )
    trainer.fit(model, datamodule=dm)
    return timer.times


def plain_round(model, loader, steps, warmup, device, precision) -> list[float]:
    model = model.to(device).train()
    opt = model.configure_optimizers()["optimizer"]
    autocast = precision.startswith("bf16")
    times, it = [], iter(loader)
    for i in range(steps + warmup):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t0 = time.perf_counter()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(batch["input_ids"])
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), batch["targets"].flatten())
            loss = loss + sum(out.aux_losses.values(), torch.zeros((), device=device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/transformer_tiny.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="5 steps x 2 rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, help="default: the config's trainer.precision")
    p.add_argument("overrides", nargs="*", help="extra CLI overrides, e.g. --data.init_args.batch_size=8")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 5, 2
    torch.manual_seed(0)
    model, dm, cli = build(args.config, args.overrides)
    precision = args.precision or str(cli.config.trainer.precision or "32-true")
    dm.setup("fit")
    model.set_tokenizer(dm.tokenizer) if hasattr(model, "set_tokenizer") else None
    init_state = copy.deepcopy(model.state_dict())
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    block, batch = dm.block_size, dm.batch_size
    tokens_per_step = block * batch

    lit_times, plain_times = [], []
    for r in range(args.rounds):  # interleaved rounds
        model.load_state_dict(init_state)
        lit_times += lightning_round(model, dm, args.steps, args.warmup, accelerator, precision)
        model.load_state_dict(init_state)
        plain_times += plain_round(model, dm.train_dataloader(), args.steps, args.warmup, device, precision)

    peak = measure_matmul_peak_flops(n=2048 if device.type == "cuda" else 1024, device=args.device,
                                     dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    fpt = model.flops_per_token(block) if hasattr(model, "flops_per_token") else None
    rows, figures = [], {}
    for name, times in (("lightning", lit_times), ("plain_pytorch", plain_times)):
        step = statistics.median(times)
        tps = tokens_per_step / step
        mfu = tps * fpt / peak if fpt else None
        rows.append({"loop": name, "median_step_s": step, "tokens_per_sec": tps, "mfu": mfu if mfu else "n/a"})
        figures[name] = {"median_step_s": step, "tokens_per_sec": tps, "mfu": mfu}
    ratio = figures["plain_pytorch"]["tokens_per_sec"] / figures["lightning"]["tokens_per_sec"]
    figures["plain_over_lightning"] = ratio
    figures["peak_flops_measured"] = peak
    figures["flops_per_token"] = fpt
    params = sum(p.numel() for p in model.parameters())
    print(f"config {args.config}: {params / 1e6:.2f}M params, block {block}, batch {batch}, precision {precision}, "
          f"{args.rounds} rounds x {args.steps} timed steps")
    print_table(rows)
    print(f"framework overhead: plain/lightning tokens/s ratio = {ratio:.3f}   (measured matmul peak {peak / 1e9:.1f} GFLOP/s)")
    print_result(figures, {"config": args.config, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                           "precision": precision, "params": params, "overrides": args.overrides})
    return 0


if __name__ == "__main__":
    run_main(main)
