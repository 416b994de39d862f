"""The training command: LightningCLI with MemLM's run layout (``python train.py ...``)."""
from __future__ import annotations

import lightning as L

from memlm.apps import quiet
from memlm.apps.cli import MemLMCLI
from memlm.core.errors import run_main


def main() -> int:
    quiet.install()
    MemLMCLI(L.LightningModule, L.LightningDataModule)
    return 0


def main_entry() -> None:
    run_main(main)


if __name__ == "__main__":
    main_entry()
