"""Quiet by default: the library messages known to be harmless in MemLM runs, filtered in one place.

Each filter says why it is safe. Anything a user can act on stays visible, and
``MEMLM_DEBUG=1`` turns every filter off.
"""
from __future__ import annotations

import logging
import os
import warnings

# (message regex, category, why it is harmless here)
WARNINGS = [
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", None,
     "Lightning calls a torch pytree API that torch deprecated; nothing for the user to change"),
    (r".*Checkpoint directory .* exists and is not empty.*", None,
     "MemLM's run layout reuses checkpoints/ on purpose when resuming (last.ckpt is rewritten, best is kept)"),
    (r".*The `srun` command is available on your system but is not used.*", None,
     "printed on any machine with Slurm installed; scripts/slurm/train.sbatch is the way to run under Slurm"),
    (r".*does not have many workers.*", None,
     "MemLM's token loaders are in-process memmap slices, faster than worker processes"),
    (r".*You are using a CUDA device .* that has Tensor Cores.*", None,
     "the matmul precision is a choice MemLM leaves to torch's default; it changes speed, not results"),
]

# Lightning's info-level log lines that are advertisements or restate the obvious
LOG_LINES = (
    "💡 Tip:",  # suggests installing a cloud logger
    "TPU available:",
    "HPU available:",
    "`weights_only` was not set",
    "Trainer already configured with model summary callbacks",  # MemLM's own summary replaces the default  # MemLM writes full checkpoints on purpose (resume needs optimizer state)
)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(msg.startswith(prefix) for prefix in LOG_LINES)


def install() -> None:
    """Filter the known-harmless messages unless MEMLM_DEBUG=1. Safe to call more than once."""
    if os.environ.get("MEMLM_DEBUG", "") not in ("", "0"):
        return
    for pattern, category, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category or Warning)
    import lightning.pytorch  # noqa: F401  (sets up the console handlers the filter attaches to)

    # Lightning's messages are logged on child loggers and printed by the handlers of the
    # first three; a filter on a handler sees every record that reaches it. The rank-zero
    # loggers get it too, for handlers configured later.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):
        for target in (logging.getLogger(name), *logging.getLogger(name).handlers):
            if not any(isinstance(f, _DropLines) for f in target.filters):
                target.addFilter(_DropLines())
