"""HMST configs: each size instantiated on the meta device, total/active parameter counts checked.

Active = total - (n_experts - top_k) / n_experts of the expert parameters. Measured counts
(vocab from each config's data section):

    micro:  total      3,261,716  active     1,492,244
    tiny:   total    108,072,216  active    42,011,928
    small:  total  1,050,816,032  active   371,338,784
    base:   total 12,237,233,188  active 3,743,767,588
"""
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from memlm.models.hmst.model import HMSTConfig, HMSTModel

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# stated sizes: (total, active). micro is a CPU toy; base's active target is the reachable one
# (top-2 of 8 experts forces active >= total / 4; see configs/hmst_base.yaml).
STATED = {
    "micro": (3.3e6, 1.5e6),
    "tiny": (100e6, 42e6),
    "small": (1.0e9, 0.37e9),
    "base": (12e9, 3.7e9),
}


def _model_on_meta(size: str):
    cfg = yaml.safe_load((CONFIGS / f"hmst_{size}.yaml").read_text())
    args = cfg["model"]["init_args"]
    fields = {f.name for f in dataclasses.fields(HMSTConfig)}
    hc = HMSTConfig(vocab_size=cfg["data"]["init_args"]["vocab_size"], **{k: v for k, v in args.items() if k in fields})
    with torch.device("meta"):
        model = HMSTModel(hc)
    return model, hc, cfg


@pytest.mark.parametrize("size", list(STATED))
def test_parameter_counts_match_stated_sizes(size):
    model, hc, cfg = _model_on_meta(size)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = model.param_counts()
    total, active = STATED[size]
    print(f"hmst_{size}: total={counts['total']:,} active={counts['active']:,} experts={counts['expert']:,}")
    assert abs(counts["total"] - total) / total < 0.15, counts
    assert abs(counts["active"] - active) / active < 0.15, counts
    # active follows the top-k definition exactly
    expert = sum(p.numel() for b in model.blocks for p in b.moe.experts.parameters())
    assert counts["active"] == counts["total"] - expert * (hc.n_experts - hc.top_k) // hc.n_experts
    assert counts["active"] >= counts["total"] * hc.top_k / hc.n_experts  # the floor that rules out 2B active at 12B


@pytest.mark.parametrize("size", list(STATED))
def test_config_shape_and_platform_conventions(size):
    _, hc, cfg = _model_on_meta(size)
    assert "vocab_size" not in cfg["model"]["init_args"]  # linked from data.vocab_size
    assert cfg["model"]["class_path"] == "memlm.lightning_modules.hmst.module.HMSTLanguageModel"
    assert cfg["data"]["init_args"]["sampler"] == "stream"  # stateful: SSM state carried across chunks
    assert cfg["data"]["init_args"]["block_size"] == hc.block_size
    assert hc.n_experts == 8 and hc.top_k == 2
    if size in ("micro", "tiny"):
        assert cfg["data"]["init_args"]["source"] == "builtin"  # offline
        assert cfg["trainer"]["precision"] == "32-true"
    else:
        assert cfg["data"]["init_args"]["dataset_config"] == "wikitext-103-raw-v1"
        assert cfg["trainer"]["precision"] == "bf16-mixed"
        assert "ddp" in cfg["trainer"]["strategy"]
