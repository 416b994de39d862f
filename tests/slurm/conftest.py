"""The session's one-node Slurm cluster: started on first use, stopped at the end."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from slurm_cluster import LocalSlurm, why_unavailable


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    # Its own directory, not pytest's basetemp: a concurrent pytest session prunes old basetemps.
    root = Path(tempfile.mkdtemp(prefix="memlm-slurm-"))
    cluster = LocalSlurm(root, cpus=2)
    cluster.start()  # a cluster that should start but does not is a failure, not a skip
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
