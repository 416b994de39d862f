"""LTML: long-term memory for any chat model, without fine-tuning.

Log everything (:mod:`memlm.memory.ltml.store`, SQLite), consolidate while idle
(:mod:`memlm.memory.ltml.sleep`), inject what matters when a session starts and at every turn
(:mod:`memlm.memory.ltml.wake`). :class:`memlm.apps.ltml_session.LTMLMemory` ties them together for
chat.py and serve.py; ``python -m memlm.apps.ltml`` is the command line.
"""
from memlm.memory.ltml.store import SCHEMA_VERSION, Memory, Store  # noqa: F401
