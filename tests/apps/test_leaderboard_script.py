"""bench/leaderboard.py's own logic that needs no training: which finished runs --reuse scores."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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


def sweep():
    spec = importlib.util.spec_from_file_location("leaderboard_sweep", ROOT / "bench" / "leaderboard_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["transformer", "hamt", "hmst", "htm"])
def test_every_sweep_setting_reaches_the_model_through_the_cli(arch, capsys):
    """Each override of bench/leaderboard_sweep.py's grid parses against its leaderboard config and
    changes what it names; the first setting of each architecture is the config as committed."""
    import lightning as L
    import yaml

    from memlm.apps.cli import MemLMCLI

    sw = sweep()
    config = ROOT / sw.ARCHITECTURES[arch]
    committed = yaml.safe_load(config.read_text())["model"]["init_args"]
    settings = list(sw.GRID[arch].items())
    assert settings[0][1] == []
    printed = []
    for _, extra in settings:
        with pytest.raises(SystemExit) as info:
            MemLMCLI(L.LightningModule, L.LightningDataModule, args=["fit", "--config", str(config), *extra, "--print_config"])
        assert info.value.code in (0, None)
        printed.append(yaml.safe_load(capsys.readouterr().out)["model"]["init_args"])
    for (_, extra), got in zip(settings[1:], printed[1:]):
        key, value = extra[0].split("=")
        path = key.removeprefix("--model.init_args.").split(".")
        node, base = got, committed
        for part in path:
            node, base = node[part], base[part]
        assert float(node) == float(value) != float(base), (arch, key)
