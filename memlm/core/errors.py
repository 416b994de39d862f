"""User-facing errors: one line that starts with ``error:`` and says what to do.

Every entry point (train.py, chat.py, serve.py, bench scripts, ``python -m`` tools) wraps
its main in :func:`run_main`, so a :class:`MemLMError` (or a plain missing file) becomes a
single line on stderr and a non-zero exit, with the traceback kept for ``MEMLM_DEBUG=1``.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


class MemLMError(Exception):
    """An error caused by the user's input (config, file, checkpoint, server, data)."""


def debug_enabled() -> bool:
    return os.environ.get("MEMLM_DEBUG", "") not in ("", "0")


def format_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    return msg if msg.startswith("error:") else f"error: {msg}"


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; turn user errors into one ``error:`` line and exit code 2."""
    try:
        rc = main()
    except (MemLMError, FileNotFoundError) as exc:
        if debug_enabled():
            raise
        print(format_error(exc), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(rc) if isinstance(rc, int) else 0)
