"""What a run's W&B dashboard is filtered and grouped by: code version, tokenizer, model size,
hardware and world size, plus the group (architecture) and tags (size, stage)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIZES = ("micro", "tiny", "small", "base", "large")


def git_state(repo: Path = REPO) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit.strip() if commit else None, "dirty": bool(status.strip()) if status is not None else None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(world_size: int | None) -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "gpu": gpus[0] if gpus else None, "gpu_count": len(gpus),
            "world_size": world_size}


def world_size(trainer_cfg) -> int | None:
    """Processes the run will use: from the launcher's environment, else num_nodes x devices."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    devices = trainer_cfg.get("devices")
    n = len(devices) if isinstance(devices, (list, tuple)) else int(devices) if str(devices).isdigit() else None
    return n * int(trainer_cfg.get("num_nodes") or 1) if n else None


def parameter_counts(model) -> dict:
    """Total and trainable parameters; ``active`` (per token) when the model defines ``num_active_parameters``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    active = model.num_active_parameters() if callable(getattr(model, "num_active_parameters", None)) else total
    return {"total": total, "trainable": trainable, "active": int(active)}


def tokenizer_info(datamodule) -> dict | None:
    tok = getattr(datamodule, "tokenizer", None) if datamodule is not None else None
    if tok is None:
        return None
    return {"kind": getattr(tok, "kind", type(tok).__name__), "vocab_size": int(tok.vocab_size)}


def group_and_tags(model, run_name: str, stage: str | None) -> tuple[str, list[str]]:
    """Group = architecture (module class); tags = size (from the run/config name) and stage."""
    group = type(model).__name__
    parts = run_name.lower().replace("-", "_").split("_")
    tags = [f"size:{s}" for s in SIZES if s in parts][:1]
    if stage:
        tags.append(f"stage:{stage}")
    return group, tags


def run_metadata(model, datamodule, trainer_cfg, run_name: str, stage: str | None) -> dict:
    group, tags = group_and_tags(model, run_name, stage)
    return {
        "git": git_state(), "tokenizer": tokenizer_info(datamodule), "params": parameter_counts(model),
        "hardware": hardware(world_size(trainer_cfg)), "architecture": group, "stage": stage, "tags": tags,
    }
