"""MemLM training entry point (LightningCLI): fit / validate / test / predict.

    python train.py fit --config configs/transformer_micro.yaml
    python train.py fit --config configs/hmst_small.yaml --trainer.devices=4 --trainer.strategy=ddp
    python train.py fit --config configs/hamt_micro.yaml --ckpt_path last     # resume
"""
from __future__ import annotations

import lightning as L

from memlm.cli import MemLMCLI
from memlm.errors import run_main


def main() -> int:
    MemLMCLI(L.LightningModule, L.LightningDataModule)
    return 0


if __name__ == "__main__":
    run_main(main)
