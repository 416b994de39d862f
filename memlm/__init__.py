"""MemLM: a PyTorch Lightning platform for memory-augmented and brain-inspired language models.

Everything installs under this one name, in four layers (each imports only those below it):

1. ``memlm.core``: errors, tokenizer, ``ModelOutput``, sampling, HTTP client, checkpoint I/O;
2. ``memlm.models`` and ``memlm.memory``: plain ``nn.Module`` models and memory stores;
3. ``memlm.lightning_modules``, ``memlm.callbacks``, ``memlm.datamodules``: training;
4. ``memlm.apps`` (and ``memlm.checkpoint``): the CLI, chat, serving, LTML session.

In the repository, ``models/``, ``memory/``, ``lightning_modules/``, ``callbacks/`` and
``datamodules/`` sit at the top level; setup.cfg maps them under ``memlm.`` so that no generic
top-level name (``callbacks``, ``memory``) is installed into site-packages.
"""
