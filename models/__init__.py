"""Layer 2: one plain ``nn.Module`` (or online learner) per architecture, with its config dataclass.

Nothing here imports Lightning, a datamodule or a parallelism API; the LightningModules in
``memlm.lightning_modules`` wrap these.
"""
