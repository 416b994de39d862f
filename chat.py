"""Talk to any MemLM checkpoint or OpenAI-compatible server (see ``python chat.py --help``).

The command lives in :mod:`memlm.apps.chat` (installed as ``memlm-chat``).
"""
from memlm.apps.chat import main_entry

if __name__ == "__main__":
    main_entry()
