"""Known-harmless library messages are filtered in one place; MEMLM_DEBUG=1 shows them all."""
from __future__ import annotations

import logging
import subprocess
import sys

SNIPPET = r"""
import logging, warnings
from memlm.apps import quiet
quiet.install()
warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use something else")
warnings.warn("Checkpoint directory /x exists and is not empty.")
warnings.warn("an actionable warning the user must see")
from lightning.pytorch.utilities import rank_zero_info
import lightning.pytorch  # configures Lightning's console handler
rank_zero_info("💡 Tip: For seamless cloud logging, try installing something")
rank_zero_info("GPU available: False, used: False")
"""


def _run(debug: str) -> str:
    env = {"MEMLM_DEBUG": debug, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_harmless_messages_are_filtered_and_actionable_ones_kept():
    out = _run("0")
    assert "LeafSpec" not in out and "exists and is not empty" not in out and "Tip:" not in out
    assert "an actionable warning the user must see" in out and "GPU available" in out


def test_memlm_debug_shows_everything():
    out = _run("1")
    assert "LeafSpec" in out and "exists and is not empty" in out and "Tip:" in out


def test_install_is_idempotent():
    from memlm.apps import quiet

    quiet.install()
    quiet.install()
    handlers = logging.getLogger("lightning.pytorch").handlers
    assert all(sum(isinstance(f, quiet._DropLines) for f in h.filters) <= 1 for h in handlers)
