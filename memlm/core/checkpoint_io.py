"""Reading a MemLM checkpoint file: ``torch.load(weights_only=True)`` and one-line errors.

Rebuilding the module it holds is :func:`memlm.checkpoint.load_module` (layer 4), since that
imports whichever architecture the file names.
"""
from __future__ import annotations

from pathlib import Path

import torch

from memlm.core.errors import MemLMError


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise MemLMError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise MemLMError(f"cannot read checkpoint {path}: it is corrupt or not a MemLM/Lightning checkpoint ({type(exc).__name__})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise MemLMError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if "memlm" not in ckpt:
        raise MemLMError(f"{path} was not written by MemLM (no 'memlm' section); train it with train.py")
    return ckpt
