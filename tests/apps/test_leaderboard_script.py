"""bench/leaderboard.py's own logic that needs no training: which finished runs --reuse scores."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def leaderboard():
    spec = importlib.util.spec_from_file_location("leaderboard", ROOT / "bench" / "leaderboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reuse_takes_only_a_finished_run_of_the_same_budget(tmp_path):
    lb = leaderboard()
    snaps = tmp_path / "snapshots"
    assert not lb.finished_run(snaps, 10)  # nothing there
    snaps.mkdir()
    elapsed = {f"budget-{k}of4.ckpt": 150.0 * k for k in range(1, 5)}
    (snaps / "budget_elapsed.json").write_text(json.dumps(elapsed))
    for name in list(elapsed)[:3]:
        (snaps / name).write_bytes(b"x")
    assert not lb.finished_run(snaps, 10), "the last snapshot is missing: the run did not finish"
    (snaps / "budget-4of4.ckpt").write_bytes(b"x")
    assert lb.finished_run(snaps, 10)
    assert not lb.finished_run(snaps, 1), "a 10-minute run is not a 1-minute run"
    (snaps / "budget_elapsed.json").write_text("{not json")
    assert not lb.finished_run(snaps, 10)
