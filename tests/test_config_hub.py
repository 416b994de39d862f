"""Every configs/*.yaml parses with the real CLI parser and its model can be built.

Models are built on the meta device (no memory, so the GPU-sized presets are cheap), the
vocabulary size taken from ``data.init_args.vocab_size`` (256 when the tokenizer is char/byte
or unknown, as the CLI links the real one in at instantiation). A config that states its
size in its header comment (``~124M params``, ``5.0M non-embedding parameters``, ``0.996M vs
0.984M``) must match one of the stated numbers within 6%. A model that cannot live on the
meta device (non-gradient HTM / Hebbian state in numpy) is built for real when it is a
micro config, and otherwise skipped with the reason.
"""
from __future__ import annotations

import re
import resource
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from memlm.checkpoint import resolve_class
from memlm.apps.cli import MemLMCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class _Parsed(Exception):
    pass


class _ParseOnly(MemLMCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def parse(config: Path):
    with pytest.raises(_Parsed) as info:
        _ParseOnly(L.LightningModule, L.LightningDataModule, args=["fit", "--config", str(config)])
    return info.value.args[0]["fit"]


def vocab_for(data_init: dict) -> int:
    tok = str(data_init.get("tokenizer", "") or "")
    if tok in ("char", "byte") or not data_init.get("vocab_size"):
        return 256
    return int(data_init["vocab_size"])


def stated_sizes(config: Path) -> list[tuple[bool, list[float]]]:
    """(non_embedding?, [numbers in millions]) for each header comment line that states a size."""
    out, prev = [], ""
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        nums = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)M\b", line)]
        # a size statement may wrap: "matched non-embedding\n# parameters (...: 0.996M vs 0.984M)"
        if nums and ("param" in line or "param" in prev):
            out.append(("non-embedding" in line or "non-embedding" in prev, nums))
        prev = line
    return out


def count(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return total, total - sum(params[i].numel() for i in emb if i in params)


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_and_builds(config):
    cfg = parse(config)
    model_cfg, data_cfg = cfg["model"], cfg["data"]
    assert model_cfg["class_path"] and data_cfg["class_path"]
    resolve_class(data_cfg["class_path"])  # the data class imports
    cls = resolve_class(model_cfg["class_path"])
    init_args = model_cfg.get("init_args")
    # as_dict keeps groups nested (optimizer: {...}); dict() would flatten them to "optimizer.learning_rate"
    init = init_args.as_dict() if init_args is not None else {}
    raw = yaml.safe_load(config.read_text()) or {}
    raw_init = ((raw.get("model") or {}).get("init_args") or {})
    assert "vocab_size" not in raw_init, "model.init_args.vocab_size is linked from data.vocab_size; do not set it"
    init["vocab_size"] = vocab_for(dict(data_cfg.get("init_args") or {}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with torch.device("meta"):
            model = cls(**init)
        on_meta = True
    except Exception as exc:  # numpy / .item() state cannot be on the meta device
        if "micro" not in config.stem:
            pytest.skip(f"{cls.__name__} cannot be built on the meta device ({type(exc).__name__}: {exc}); "
                        "only its micro config is built for real")
        model = cls(**init)
        on_meta = False
    if on_meta:
        assert all(p.is_meta for p in model.parameters())
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 256, f"meta-device build allocated {grown_mb:.0f} MB"
    total, non_emb = count(model)
    gradient_free = not any(p.requires_grad for p in model.parameters())
    assert total > 0 or gradient_free, f"{cls.__name__} has no parameters"
    for non_embedding, nums in stated_sizes(config):
        n = (non_emb if non_embedding else total) / 1e6
        assert any(abs(n - x) <= 0.06 * x for x in nums), (
            f"{config.name} states {nums}M {'non-embedding ' if non_embedding else ''}params, the model has {n:.3f}M")


def test_every_config_follows_the_naming_convention():
    pattern = re.compile(r"^[a-z0-9]+_(micro|tiny|small|base)(_[a-z0-9_]+)?\.yaml$")
    bad = [p.name for p in CONFIGS if not pattern.match(p.name)]
    assert not bad, f"configs must be named <arch>_<micro|tiny|small|base>[_<variant>].yaml: {bad}"
    assert (ROOT / "configs" / "transformer_micro.yaml") in CONFIGS
