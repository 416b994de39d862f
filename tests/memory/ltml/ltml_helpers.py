"""Shared helpers for the LTML tests (a uniquely named module, safe to import from test files)."""
from __future__ import annotations

DAY = 86400.0
T0 = 1_700_000_000.0


def log_session(store, texts, day, role="user"):
    """Log ``texts`` as one session on ``day`` (seconds apart); returns the interaction ids."""
    at = T0 + day * DAY
    sid = store.start_session("test", at=at)
    return [store.log(sid, role, t, at=at + i) for i, t in enumerate(texts)]
