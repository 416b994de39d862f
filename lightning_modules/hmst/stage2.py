"""HMST stage 2 (memory fine-tuning): start from a stage-1 checkpoint, freeze or slow the base.

``init_checkpoint`` (a model init arg) names the stage-1 file: its weights, tokenizer and
memories are loaded into the freshly built module before training; a missing file, a file of
another architecture or one with other shapes is a one-line error. Unlike ``--ckpt_path``
(which resumes a run: optimizer, step and all), this starts a new run with its own optimizer.

The *memory path* (what stage 2 trains at the full learning rate) is the episodic SSM and its
gate, the memory reader, the meta-controller and the critic; the *base* (embeddings, MoE
blocks, norms) is frozen (``base_lr_scale: 0``) or trained at ``base_lr_scale`` x the rate.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from memlm.core.checkpoint_io import read_checkpoint
from memlm.core.errors import MemLMError

MEMORY_PREFIXES = ("model.ssm.", "model.ssm_norms.", "model.ep_norm.", "model.ep_proj.", "model.ep_gate.",
                   "model.reader.", "model.controller.", "model.critic.")
HMST_CLASS = "memlm.lightning_modules.hmst.module.HMSTLanguageModel"


# the settings a semantic item was written under (name, default): an item read under others
# means something else (a hidden state taken for a token embedding, a 1-token key for a mean)
ITEM_SETTINGS = (("mem_value", "hidden"), ("mem_key_window", 1), ("mem_key_source", "exit"))


def item_setting_changes(saved_hparams: dict | None, module) -> list[tuple[str, object, object]]:
    """(name, saved, now) for every item setting that differs between a checkpoint and ``module``."""
    saved_hparams = saved_hparams or {}
    return [(k, saved_hparams.get(k, d), module.hparams.get(k, d)) for k, d in ITEM_SETTINGS
            if saved_hparams.get(k, d) != module.hparams.get(k, d)]


def is_memory_param(name: str) -> bool:
    return name.startswith(MEMORY_PREFIXES)


def load_stage1(module, path: str | Path) -> None:
    """Load a stage-1 HMST checkpoint's weights, tokenizer and memories into ``module``."""
    path = Path(path)
    if not path.is_file():
        raise MemLMError(f"stage-2 needs a stage-1 checkpoint: {path} does not exist; train configs/hmst_micro.yaml "
                         "first (its checkpoints/last.ckpt) or set model.init_checkpoint")
    ckpt = read_checkpoint(path)
    cls = (ckpt.get("memlm") or {}).get("class_path", "")
    if cls.rsplit(".", 1)[-1] != HMST_CLASS.rsplit(".", 1)[-1]:
        raise MemLMError(f"{path} is a {cls or 'non-HMST'} checkpoint, not an HMST stage-1 checkpoint; "
                         "point model.init_checkpoint at an HMST run's checkpoint")
    state = ckpt["state_dict"]
    own = module.state_dict()
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    if wrong or missing:
        what = f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}" if wrong else f"{missing[0]} is missing"
        raise MemLMError(f"{path} does not fit this stage-2 model ({what}); use the stage-1 config's model sizes")
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    module.on_load_checkpoint({"memlm": ckpt["memlm"], "hmst_memory": ckpt.get("hmst_memory")})
    # a stage 2 that changes how items are written (mem_value, mem_key_window) starts its
    # semantic memory empty: the stage-1 items would be read as something they are not
    if item_setting_changes(ckpt.get("hyper_parameters"), module) and len(module.semantic):
        module.semantic.clear()


def apply_base_lr(module, base_lr_scale: float) -> None:
    """Freeze the base (scale 0) so the optimizer never sees it; any other scale is applied in
    :func:`scale_base_groups`."""
    if not 0.0 <= base_lr_scale <= 1.0:
        raise MemLMError(f"model.base_lr_scale must be in [0, 1] (0 freezes the base), got {base_lr_scale}")
    if base_lr_scale == 0.0:
        for name, p in module.named_parameters():
            if not is_memory_param(name):
                p.requires_grad_(False)


def scale_base_groups(module, optimizers: dict, base_lr_scale: float) -> dict:
    """Split every optimizer group into memory and base parts, the base at ``base_lr_scale`` x lr;
    rebuilds the optimizer and its LambdaLR with the same schedule."""
    if base_lr_scale in (0.0, 1.0):
        return optimizers
    opt = optimizers["optimizer"]
    sched = optimizers["lr_scheduler"]["scheduler"]
    base_ids = {id(p) for n, p in module.named_parameters() if not is_memory_param(n)}
    groups = []
    for g in opt.param_groups:
        rest = {k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
        mem = [p for p in g["params"] if id(p) not in base_ids]
        base = [p for p in g["params"] if id(p) in base_ids]
        lr = g.get("initial_lr", g["lr"])
        groups += [{"params": ps, "lr": lr * scale, **rest} for ps, scale in ((mem, 1.0), (base, base_lr_scale)) if ps]
    accepted = inspect.signature(type(opt)).parameters
    new_opt = type(opt)(groups, **{k: v for k, v in opt.defaults.items() if k in accepted})
    new_sched = torch.optim.lr_scheduler.LambdaLR(new_opt, sched.lr_lambdas[0])
    return {"optimizer": new_opt, "lr_scheduler": {**optimizers["lr_scheduler"], "scheduler": new_sched}}
