"""LTML: long-term memory for any chat model, without fine-tuning.

Log everything (:mod:`memory.ltml.store`, SQLite), consolidate while idle
(:mod:`memory.ltml.sleep`), inject what matters when a session starts and at every turn
(:mod:`memory.ltml.wake`). :class:`memory.ltml.session.LTMLMemory` ties them together for
chat.py and serve.py; ``python -m memory.ltml`` is the command line.
"""
from memory.ltml.store import SCHEMA_VERSION, Memory, Store  # noqa: F401
