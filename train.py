"""MemLM training entry point (LightningCLI): fit / validate / test / predict.

    python train.py fit --config configs/transformer_micro.yaml
    python train.py fit --config configs/hmst_small.yaml --trainer.devices=4 --trainer.strategy=ddp
    python train.py fit --config configs/hamt_micro.yaml --ckpt_path last     # resume

The command lives in :mod:`memlm.apps.train` (installed as ``memlm-train``).
"""
from memlm.apps.train import main_entry

if __name__ == "__main__":
    main_entry()
