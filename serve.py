"""OpenAI-compatible server for MemLM checkpoints (see ``python serve.py --help``).

The command lives in :mod:`memlm.apps.serve` (installed as ``memlm-serve``).
"""
from memlm.apps.serve import main_entry

if __name__ == "__main__":
    main_entry()
