"""A memory pre-flight before the first training step.

The estimate per device (bytes):

- weights: parameters x bytes per parameter (4 in fp32 and the ``*-mixed`` precisions, which
  keep fp32 master weights; 2 in ``bf16-true``/``16-true``);
- gradients: trainable parameters x the same;
- optimizer: trainable parameters x 8 (AdamW's two fp32 moments);
  FSDP shards these three over the devices, DDP replicates them;
- activations: ``n_layer x batch x block x (34 d + 5 heads block)`` elements at the
  activation width (2 bytes under mixed precision, 4 in fp32) -- the usual transformer-layer
  count, which covers the attention scores -- plus the logits ``batch x block x vocab`` at
  fp32, three times (logits, their float copy, their gradient).

It is an estimate of what the run will need, not a measurement; it errs high for models
without attention. The model is built on the meta device to count its parameters, so a
config far too large for the machine is caught before any memory is allocated.

Past the free memory (RAM on CPU, ``torch.cuda.mem_get_info`` on GPU) the run stops with one
``error:`` line that gives the estimate and the ways out; above ``WARN_FRACTION`` of it, a
warning. ``--run.skip_memory_check`` skips the check.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from memlm.core.errors import MemLMError

WARN_FRACTION = 0.8
GIB = 1024**3


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    processes_per_host: int = 1

    @property
    def per_device(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.1f}" for name in ("weights", "gradients", "optimizer", "activations"))
        return f"{self.per_device / GIB:.1f} GiB per device ({parts} GiB)"


def _first(obj, names, default=None):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


def estimate(module, batch_size: int, block_size: int, precision: str = "32-true", strategy: str = "auto",
             world_size: int = 1) -> MemoryEstimate:
    params = {id(p): p for p in module.parameters()}
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    precision = str(precision)
    weight_bytes = 2 if precision in ("bf16-true", "16-true", "bf16", "16") else 4
    act_bytes = 2 if ("16" in precision) else 4
    shard = max(1, int(world_size)) if "fsdp" in str(strategy).lower() else 1
    gradient_trained = trainable > 0 and getattr(module, "automatic_optimization", True)
    weights = total * weight_bytes / shard
    grads = trainable * weight_bytes / shard if gradient_trained else 0.0
    optim = trainable * 8 / shard if gradient_trained else 0.0
    cfg = getattr(module, "config", None)
    d = _first(cfg, ("n_embd", "d_model"))
    layers = _first(cfg, ("n_layer",), 0)
    heads = _first(cfg, ("n_head",), 0)
    vocab = _first(cfg, ("vocab_size",), getattr(module, "vocab_size", 0)) or 0
    acts = 0.0
    if gradient_trained and d:
        tokens = batch_size * block_size
        acts = layers * tokens * (34 * d + 5 * heads * block_size) * act_bytes + 3 * tokens * vocab * 4
    return MemoryEstimate(weights, grads, optim, acts)


def free_memory(accelerator: str) -> tuple[float | None, str]:
    """(free bytes, what) for the device the run trains on."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and _cuda()):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return float(free), f"GPU {torch.cuda.get_device_name(0)}"
    return _available_ram(), "RAM"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _available_ram() -> float | None:
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = float(line.split()[1]) * 1024
    except OSError:
        pass
    # a container's cgroup limit may be lower than the host's free memory
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = float(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if raw != "max":
            room = float(raw) - used
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


def check(est: MemoryEstimate, free: float | None, where: str, devices_here: int = 1, override: bool = False) -> str | None:
    """Raise past the limit; return a warning line near it; None when it fits or cannot be told."""
    if override or free is None:
        return None
    # on a CPU every rank of this host shares the same RAM
    need = est.per_device * (devices_here if where == "RAM" else 1)
    if need > free:
        raise MemLMError(
            f"this run needs about {need / GIB:.1f} GiB but {where} has {free / GIB:.1f} GiB free "
            f"(estimate: {est.describe()}); use a GPU, --trainer.precision bf16-mixed, FSDP "
            "(--trainer.strategy fsdp), a smaller --data.init_args.batch_size or a smaller config, "
            "or skip this check with --run.skip_memory_check true"
        )
    if need > WARN_FRACTION * free:
        return (f"warning: this run needs about {need / GIB:.1f} GiB of the {free / GIB:.1f} GiB free {where} "
                f"({est.describe()}); it may run out of memory")
    return None


def build_on_meta(class_path: str, init_args: dict):
    """The module built on the meta device (no memory), or None when it cannot be."""
    import torch

    from memlm.checkpoint import resolve_class

    cls = resolve_class(class_path)
    try:
        with torch.device("meta"):
            return cls(**init_args)
    except Exception:  # online learners keep numpy state that cannot live on the meta device
        return None


def say(line: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr)
