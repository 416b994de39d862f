"""Load any MemLM checkpoint, whatever its architecture, for chat, serving and evaluation.

The class is read from ``checkpoint["memlm"]["class_path"]`` (written by MemLMModule), so
a bare ``.ckpt`` is enough. Loading uses ``torch.load(weights_only=True)``.

    python -m memlm.checkpoint info CKPT
    python -m memlm.checkpoint export-tokenizer CKPT OUT.json
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from memlm.core.checkpoint_io import read_checkpoint
from memlm.core.errors import MemLMError, run_main


# Checkpoints written before the packages moved under ``memlm.`` name their class by the old
# top-level module (``lightning_modules.transformer.TransformerLM``); the weights are the same.
LEGACY_PREFIXES = ("lightning_modules.", "callbacks.", "datamodules.", "memory.")


def upgrade_class_path(class_path: str) -> str:
    """The current import path of a class recorded by an older MemLM checkpoint."""
    if class_path.startswith(LEGACY_PREFIXES):
        return "memlm." + class_path
    return class_path


def resolve_class(class_path: str):
    class_path = upgrade_class_path(class_path)
    module_name, _, cls_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise MemLMError(f"checkpoint class {class_path!r} cannot be imported ({exc})") from exc


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the LightningModule stored in ``path``, in eval mode, with its tokenizer."""
    ckpt = read_checkpoint(path, map_location)
    cls = resolve_class(ckpt["memlm"]["class_path"])
    # LightningCLI records "_class_path"/"_instantiator" beside the real init args.
    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    # older checkpoints may store settings since regrouped (flat learning_rate -> optimizer.learning_rate)
    upgrade = getattr(cls, "upgrade_hparams", None)
    if upgrade is not None:
        hparams = upgrade(hparams)
    try:
        module = cls(**hparams)
    except TypeError as exc:
        raise MemLMError(f"checkpoint hyperparameters do not match {cls.__name__}: {exc}") from exc
    module.on_load_checkpoint(ckpt)
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected or [m for m in missing if not m.endswith(("rope_cos", "rope_sin"))]:
        raise MemLMError(f"checkpoint weights do not fit {cls.__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    module.eval()
    module.checkpoint_info = {"path": str(path), "global_step": int(ckpt.get("global_step") or 0),
                              "class_path": upgrade_class_path(ckpt["memlm"]["class_path"])}
    return module.to(map_location)


def served_name(path: str | Path, global_step: int) -> str:
    """``<run name>@step<N>`` for a checkpoint in the run layout (runs/<name>/<version>/checkpoints/),
    else ``<file stem>@step<N>``: a model id that says which run and how far it trained."""
    path = Path(path)
    if path.parent.name == "checkpoints" and len(path.parents) >= 3:
        name = path.parents[2].name
    else:
        name = path.stem
    return f"{name}@step{int(global_step)}"


def _main() -> int:
    p = argparse.ArgumentParser(prog="python -m memlm.checkpoint")
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="print class, hyperparameters and tokenizer of a checkpoint")
    info.add_argument("ckpt")
    exp = sub.add_parser("export-tokenizer", help="write the checkpoint's tokenizer as JSON")
    exp.add_argument("ckpt")
    exp.add_argument("out")
    args = p.parse_args()
    ckpt = read_checkpoint(args.ckpt)
    if args.cmd == "info":
        print("class:", ckpt["memlm"]["class_path"])
        print("global_step:", ckpt.get("global_step"), "epoch:", ckpt.get("epoch"))
        print("hyper_parameters:", dict(ckpt.get("hyper_parameters") or {}))
        return 0
    tok = ckpt["memlm"].get("tokenizer")
    if not tok:
        raise MemLMError("checkpoint has no tokenizer")
    Path(args.out).write_text(tok, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(_main)
